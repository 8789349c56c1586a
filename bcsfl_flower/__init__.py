"""bcsfl-flower: BCS-FL (PoS committees, cosine screening, 2/3 consensus, audit) for Flower."""

__version__ = "0.1.0"
