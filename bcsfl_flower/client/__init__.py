"""Client side: the bcsfl client mod, and its CKKS variant."""
