"""On-chain audit trail: contract compilation, dev-chain backends, binding and model store."""
