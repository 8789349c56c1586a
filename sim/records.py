"""Turn a run's ``results.json`` into per-round rows and a per-run summary.

The app records, per round, the central test accuracy and loss and the test set's
confusion matrix; BCSFL rounds also carry the clients, the rejected ones with reasons,
the consensus outcome and the per-round attacker precision and recall. This module
derives the experiment metrics from those records (see :mod:`sim.metrics`) without
reading anything else, so a table can be rebuilt from committed result files alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcsfl_vision.results import RESULTS_FILE
from sim.grid import LABEL_FLIP, ExperimentSpec
from sim.metrics import (
    attack_success_rate,
    count_rollbacks,
    mean_defined,
    min_source_class_accuracy,
    source_class_accuracy,
)

TIMING_FILE = "timing.json"
"""The runner's record of a run's wall time, beside its ``results.json``."""

ROUND_COLUMNS = (
    "run_id",
    "dataset",
    "strategy",
    "attack",
    "attacker_fraction",
    "attacker_stake_share",
    "seed",
    "round",
    "test_accuracy",
    "test_loss",
    "source_accuracy",
    "min_source_class_accuracy",
    "attack_success_rate",
    "attacker_precision",
    "attacker_recall",
    "num_rejected",
    "rejected_partitions",
    "outcome",
)
"""Columns of ``rounds.csv``: one row per run and round (round 0 is the initial model)."""

SUMMARY_COLUMNS = (
    "run_id",
    "dataset",
    "strategy",
    "attack",
    "attacker_fraction",
    "attacker_stake_share",
    "seed",
    "num_clients",
    "num_rounds",
    "final_accuracy",
    "final_source_accuracy",
    "final_min_source_class_accuracy",
    "final_attack_success_rate",
    "mean_attacker_precision",
    "mean_attacker_recall",
    "mean_rejected",
    "rollbacks",
    "wall_s",
)
"""Columns of ``summary.csv``: one row per run.

``attacker_stake_share`` (both files) is empty for runs where every client has the same
stake; ``seed`` tells the repetitions of a cell apart."""


@dataclass(frozen=True)
class RunResult:
    """A completed run: its spec, its ``results.json`` document and its wall time.

    ``wall_s`` is the launcher's time for the whole ``flwr run`` (start-up included),
    as the runner recorded it in ``timing.json``; None if it was not recorded.
    """

    spec: ExperimentSpec
    results: dict[str, Any]
    wall_s: float | None = None

    @classmethod
    def load(cls, spec: ExperimentSpec, run_dir: Path) -> RunResult:
        """Read the run's ``results.json`` from ``run_dir``.

        Raises
        ------
        ValueError
            If the run did not complete.
        """
        results = json.loads((Path(run_dir) / RESULTS_FILE).read_text())
        if results.get("status") != "completed":
            raise ValueError(f"run {spec.run_id} in {run_dir} is {results.get('status')!r}")
        try:
            wall_s = float(json.loads((Path(run_dir) / TIMING_FILE).read_text())["wall_s"])
        except (OSError, ValueError, KeyError):
            wall_s = None
        return cls(spec, results, wall_s)

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Per-round records in round order (round 0 is the initial model)."""
        records = self.results.get("rounds", {})
        return [records[key] for key in sorted(records, key=int)]

    @property
    def measures_label_flip(self) -> bool:
        """Whether source-class accuracy and ASR apply (label-flipping runs, clean included)."""
        return self.spec.attack == LABEL_FLIP

    def round_rows(self) -> list[dict[str, Any]]:
        """Return one row per round with :data:`ROUND_COLUMNS`; missing values are None."""
        return [self._row(record) for record in self.rounds]

    def summary(self) -> dict[str, Any]:
        """Return the run's row of :data:`SUMMARY_COLUMNS`."""
        rows = self.round_rows()
        trained = [row for row in rows if row["round"] > 0]
        last = rows[-1] if rows else {}
        final = self.results.get("final_test_accuracy", last.get("test_accuracy"))
        rejected = [row["num_rejected"] for row in trained]
        return {
            **self._identity(),
            "num_clients": self.spec.num_clients,
            "num_rounds": self.spec.num_rounds,
            "final_accuracy": final,
            "final_source_accuracy": last.get("source_accuracy"),
            "final_min_source_class_accuracy": last.get("min_source_class_accuracy"),
            "final_attack_success_rate": last.get("attack_success_rate"),
            "mean_attacker_precision": mean_defined(r["attacker_precision"] for r in trained),
            "mean_attacker_recall": mean_defined(r["attacker_recall"] for r in trained),
            "mean_rejected": mean_defined(rejected),
            "rollbacks": count_rollbacks(self.results.get("rounds", {})),
            "wall_s": self.wall_s,
        }

    def _identity(self) -> dict[str, Any]:
        return {
            "run_id": self.spec.run_id,
            "dataset": self.spec.dataset,
            "strategy": self.spec.strategy,
            "attack": self.spec.attack,
            "attacker_fraction": self.spec.attacker_fraction,
            "attacker_stake_share": self.spec.attacker_stake_share,
            "seed": self.spec.seed,
        }

    def _row(self, record: dict[str, Any]) -> dict[str, Any]:
        confusion = record.get("confusion")
        flip = self.measures_label_flip and confusion is not None
        has_screening = record.get("round", 0) > 0 and "rejected" in record
        partitions = record.get("rejected_partitions")
        return {
            **self._identity(),
            "round": int(record["round"]),
            "test_accuracy": record.get("test_accuracy"),
            "test_loss": record.get("test_loss"),
            "source_accuracy": source_class_accuracy(confusion) if flip else None,
            "min_source_class_accuracy": min_source_class_accuracy(confusion) if flip else None,
            "attack_success_rate": attack_success_rate(confusion) if flip else None,
            "attacker_precision": record.get("attacker_precision"),
            "attacker_recall": record.get("attacker_recall"),
            "num_rejected": len(record["rejected"]) if has_screening else None,
            "rejected_partitions": (
                ";".join(str(p) for p in partitions) if partitions is not None else None
            ),
            "outcome": record.get("outcome"),
        }
