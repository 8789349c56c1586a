"""Shared test setup: point the data directory at the repository's offline MNIST copy."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("BCSFL_DATA_DIR", REPO / "data")).resolve()
os.environ.setdefault("BCSFL_DATA_DIR", str(DATA_DIR))

# Building a flwr Message outside a running app needs the process's task identity
# (a ServerApp process has it set by Flower); unit tests act as that process.
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
