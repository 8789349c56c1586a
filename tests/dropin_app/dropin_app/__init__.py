"""dropin-app: a Flower / PyTorch app."""
