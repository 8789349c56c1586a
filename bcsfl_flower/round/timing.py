"""Where a round's wall time goes: training, deciding, the committee, anchoring.

A BCSFL round adds exchanges and work to FedAvg's. To cut that overhead, and to report
how a round scales with the number of clients, each round record carries the seconds
spent in each part (``timing`` in ``results.json``):

- ``training_s``: from the train messages going out to ``aggregate_train`` (the clients'
  training and the transfer of their replies, as for FedAvg);
- ``decision_s``: the server's own work on the replies (checks, bounds, screening,
  committee, candidates, the vote count, checking the miners' signatures, settlement;
  with CKKS also the Gram exchange);
- ``committee_s``: the committee exchanges: the validators evaluate ``w_t`` and every
  candidate and sign their ballots, then the miners recompute the decision and sign it;
- ``anchoring_s``: the transaction that anchors the round or records its rollback.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STAGES = ("committee", "anchoring")
"""The timed parts of :meth:`RoundPipeline.run`; the rest of its time is the decision."""


@dataclass(frozen=True)
class StageTimes:
    """Seconds one round spent in each part (see the module docstring)."""

    decision_s: float = 0.0
    committee_s: float = 0.0
    anchoring_s: float = 0.0
    training_s: float | None = None

    def to_json(self) -> dict[str, float]:
        """Return the times in milliseconds' precision; training only when measured."""
        times = {
            "decision_s": self.decision_s,
            "committee_s": self.committee_s,
            "anchoring_s": self.anchoring_s,
        }
        if self.training_s is not None:
            times["training_s"] = self.training_s
        return {key: round(value, 3) for key, value in times.items()}


class StageClock:
    """Measure one round: its total time and the time inside each of :data:`STAGES`."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to stage ``name``."""
        if name not in self._seconds:
            raise ValueError(f"unknown stage {name!r}; the stages are {STAGES}")
        begun = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - begun

    def times(self) -> StageTimes:
        """Return the stages' times so far; the decision is the rest of the elapsed time."""
        elapsed = time.perf_counter() - self._started
        staged = sum(self._seconds.values())
        return StageTimes(
            decision_s=max(elapsed - staged, 0.0),
            committee_s=self._seconds["committee"],
            anchoring_s=self._seconds["anchoring"],
        )
