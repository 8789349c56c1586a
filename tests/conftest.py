"""Shared test setup: point the data directory at the repository's offline MNIST copy."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("BCSFL_DATA_DIR", REPO / "data")).resolve()
os.environ.setdefault("BCSFL_DATA_DIR", str(DATA_DIR))
