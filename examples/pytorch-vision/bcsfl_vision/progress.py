"""Live progress of a federation, read from its results file as each round lands.

The ServerApp rewrites ``results.json`` after every round (:mod:`bcsfl_vision.results`),
so the launcher, which only sees ``flwr run``'s log, can follow a run without parsing
log lines: it polls the file's modification time and, when it changes, shows the last
round's decision (committed or rolled back), its test accuracy and whether it was
anchored. Rendering and the time estimate are `rich`'s (:class:`rich.progress.Progress`):
when the output is not a terminal, rich prints no animation, so logs stay clean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

NUM_ROUNDS_KEY = "num-server-rounds"
"""Run-config key of the number of rounds, as the results file records the run config."""


@dataclass(frozen=True)
class RoundReport:
    """What a person following a run wants to know about its last finished round.

    Attributes
    ----------
    server_round : int
        The round (1-based; round 0 is the initial evaluation and is not reported).
    outcome : str or None
        ``"commit"`` or ``"rollback"`` for BCSFL; ``None`` for strategies that always
        apply their aggregate (FedAvg and Flower's robust aggregators).
    test_accuracy : float or None
        Centralised test accuracy after the round, when the run evaluates one.
    anchored : bool or None
        Whether the round's model is on chain; ``None`` when the run has no chain.
    """

    server_round: int
    outcome: str | None = None
    test_accuracy: float | None = None
    anchored: bool | None = None

    def describe(self) -> str:
        """Return a one-line summary, e.g. ``round 3: commit, acc 0.9531, anchored``."""
        parts = [self.outcome or "aggregated"]
        if self.test_accuracy is not None:
            parts.append(f"acc {self.test_accuracy:.4f}")
        if self.anchored is not None:
            parts.append("anchored" if self.anchored else "not anchored")
        return f"round {self.server_round}: " + ", ".join(parts)


def latest_round(results: Mapping[str, Any]) -> RoundReport | None:
    """Return the last finished round recorded in a results document, if any.

    Parameters
    ----------
    results : Mapping
        The parsed ``results.json`` (its ``rounds`` map round numbers, as strings, to
        round records).
    """
    rounds = results.get("rounds") or {}
    numbers = [int(key) for key in rounds if str(key).isdigit() and int(key) > 0]
    if not numbers:
        return None
    record = rounds[str(max(numbers))]
    chain = record.get("chain")
    accuracy = record.get("test_accuracy")
    return RoundReport(
        server_round=max(numbers),
        outcome=record.get("outcome"),
        test_accuracy=float(accuracy) if isinstance(accuracy, (int, float)) else None,
        anchored=bool(chain.get("anchored")) if isinstance(chain, Mapping) else None,
    )


SPEED_WINDOW_S = 3600.0
"""Seconds of history behind the ETA: rounds and grid runs take minutes, not seconds."""


def new_progress() -> Progress:
    """Return a rich progress display with a bar, ``k/N``, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.fields[label]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        speed_estimate_period=SPEED_WINDOW_S,
    )


class FederationProgress:
    """Follow one federation's rounds on a rich progress display.

    Parameters
    ----------
    results_path : Path
        The run's ``results.json``; it need not exist yet.
    label : str
        Shown in front of the bar (e.g. the run's name).
    total_rounds : int, optional
        Number of rounds; when ``None`` it is read from the run config that the results
        file records, once the file appears.
    progress : Progress, optional
        A display to add this run's bar to (the grid runner shares one across runs);
        by default the run gets its own, started and stopped with this context.
    """

    def __init__(
        self,
        results_path: Path,
        *,
        label: str = "federation",
        total_rounds: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.results_path = Path(results_path)
        self._owns_display = progress is None
        self.progress = progress if progress is not None else new_progress()
        self._total = total_rounds
        self._task: TaskID = self.progress.add_task("starting", total=total_rounds, label=label)
        self._seen_mtime: float | None = None
        self.last: RoundReport | None = None

    def __enter__(self) -> FederationProgress:
        if self._owns_display:
            self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.refresh()
        if self._owns_display:
            self.progress.stop()
        else:  # a shared display keeps the task (for its record) but stops showing it
            self.progress.update(self._task, visible=False)

    def refresh(self) -> RoundReport | None:
        """Re-read the results file if it changed, and move the bar to its last round.

        A file caught half-written is skipped: the next change is read instead.
        """
        try:
            mtime = self.results_path.stat().st_mtime
        except OSError:
            return self.last
        if mtime == self._seen_mtime:
            return self.last
        try:
            results = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return self.last
        self._seen_mtime = mtime
        if self._total is None:
            rounds = (results.get("run_config") or {}).get(NUM_ROUNDS_KEY)
            self._total = int(rounds) if isinstance(rounds, int) else None
        self.last = latest_round(results)
        if self.last is not None:
            self.progress.update(
                self._task,
                total=self._total,
                completed=self.last.server_round,
                description=self.last.describe(),
            )
        return self.last
