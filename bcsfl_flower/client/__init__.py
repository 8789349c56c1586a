"""Client side: the example ClientApp and the bcsfl client mod."""
