"""Per-round results file of a run.

``flwr run`` exits 0 even when the ServerApp failed, so a run's own output must say
whether it finished. :class:`RunRecorder` keeps one JSON document per run,
``<output-dir>/results.json``, rewritten atomically after every change: its
``status`` is ``"running"`` until :meth:`RunRecorder.finish` marks it
``"completed"`` (or :meth:`RunRecorder.fail` marks it ``"failed"`` with the error),
and ``rounds`` holds everything known about each round so far, so a crashed run
still leaves the rounds it did complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bcsfl_flower.audit.run_results import RESULTS_FILE


class RunRecorder:
    """Collect per-round records and persist them as ``results.json``.

    Parameters
    ----------
    output_dir : Path
        Absolute directory of this run's outputs; created if missing.
    run_config : Mapping[str, Any]
        The run config, stored verbatim so a results file says how it was made.
    """

    def __init__(
        self,
        output_dir: Path,
        run_config: Mapping[str, Any],
        previous: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / RESULTS_FILE
        if previous is None:
            self._document: dict[str, Any] = {
                "status": "running",
                "started_at": time.time(),
                "run_config": dict(run_config),
                "rounds": {},
            }
        else:  # a resumed run continues its own file
            self._document = dict(previous)
            self._document["status"] = "running"
            self._document.pop("error", None)
            self._document.setdefault("resumed_at", []).append(time.time())
        self._write()

    def keep_through(self, server_round: int) -> None:
        """Forget the rounds after ``server_round`` (a resumed run runs them again)."""
        rounds = self._document["rounds"]
        for key in [key for key in rounds if int(key) > server_round]:
            del rounds[key]
        self._write()

    def record(self, server_round: int, fields: Mapping[str, Any]) -> None:
        """Merge ``fields`` into the record of ``server_round`` and persist."""
        entry = self._document["rounds"].setdefault(str(server_round), {"round": server_round})
        entry.update(fields)
        self._write()

    def set(self, key: str, value: Any) -> None:
        """Set a run-level field (for example ``final_accuracy``) and persist."""
        self._document[key] = value
        self._write()

    def finish(self) -> None:
        """Mark the run completed."""
        self._document["status"] = "completed"
        self._document["finished_at"] = time.time()
        self._write()

    def fail(self, error: BaseException) -> None:
        """Mark the run failed, keeping the error's type and message."""
        self._document["status"] = "failed"
        self._document["error"] = f"{type(error).__name__}: {error}"
        self._document["finished_at"] = time.time()
        self._write()

    @property
    def rounds(self) -> dict[str, dict[str, Any]]:
        """Return the per-round records recorded so far (keys are round numbers as str)."""
        return self._document["rounds"]

    def _write(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=".results-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(self._document, handle, indent=2, default=_jsonable)
        os.replace(tmp, self.path)


def _jsonable(value: Any) -> Any:
    """Encode the non-JSON types that appear in records (bytes, numpy scalars, sets)."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in results.json")


def load_results(output_dir: Path) -> dict[str, Any]:
    """Read a run's ``results.json``."""
    return json.loads((Path(output_dir) / RESULTS_FILE).read_text())
