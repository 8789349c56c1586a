"""Write a grid's results as CSV files and a Markdown table.

- ``rounds.csv``: one row per run and round (:data:`~sim.records.ROUND_COLUMNS`);
- ``summary.csv``: one row per run (:data:`~sim.records.SUMMARY_COLUMNS`);
- ``table.md``: final test accuracy per strategy and attack cell, then every run with
  its label-flipping damage, attacker detection and rollbacks.

Cells with several seeds show the mean over seeds, their range (min–max) and how many
there are.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.grid import ATTACK_SCALES, LABEL_FLIP, STRATEGIES, Cell, share_label
from sim.records import ROUND_COLUMNS, SUMMARY_COLUMNS, RunResult

MISSING = "—"
"""Shown where a metric does not apply (e.g. rejections of a Flower baseline)."""


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` to ``path`` with ``columns``; None becomes an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return path


def write_rounds_csv(path: Path, runs: Iterable[RunResult]) -> Path:
    """Write ``rounds.csv``: every round of every run."""
    return write_csv(path, ROUND_COLUMNS, (row for run in runs for row in run.round_rows()))


def write_summary_csv(path: Path, runs: Iterable[RunResult]) -> Path:
    """Write ``summary.csv``: one row per run."""
    return write_csv(path, SUMMARY_COLUMNS, (run.summary() for run in runs))


def seed_spread(values: Sequence[float]) -> str:
    """Return a pivot cell: the mean, and with several seeds the range and their number.

    ``0.951`` for one seed, ``0.951 (0.930–0.962, 3 seeds)`` for three, and
    :data:`MISSING` for none.
    """
    if not values:
        return MISSING
    if len(values) == 1:
        return _fmt(values[0])
    return (
        f"{_fmt(float(np.mean(values)))} "
        f"({_fmt(min(values))}–{_fmt(max(values))}, {len(values)} seeds)"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def accuracy_pivot(runs: Sequence[RunResult]) -> str:
    """Return a Markdown table: final test accuracy, strategies x attack cells.

    Each cell shows the mean over the seeds run for it, and when there is more than
    one seed the range (min–max) and the number of seeds (:func:`seed_spread`).
    """
    cells = sorted({run.spec.cell for run in runs}, key=Cell.sort_key)
    values: dict[tuple[str, Cell], list[float]] = defaultdict(list)
    for run in runs:
        accuracy = run.summary()["final_accuracy"]
        if accuracy is not None:
            values[(run.spec.strategy, run.spec.cell)].append(float(accuracy))
    strategies = [s for s in STRATEGIES if any(r.spec.strategy == s for r in runs)]
    lines = [
        "| strategy | " + " | ".join(cell.label for cell in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    for strategy in strategies:
        row = [seed_spread(values.get((strategy, cell), [])) for cell in cells]
        lines.append(f"| {STRATEGIES[strategy].title} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(runs: Sequence[RunResult]) -> str:
    """Return a Markdown table with one row per run (seeds are separate rows)."""
    lines = [
        "| attack | attackers | strategy | seed | final acc | min class acc | ASR | "
        "precision | recall | rejected/round | rollbacks |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ordered = sorted(
        runs,
        key=lambda r: (
            r.spec.cell.sort_key(),
            list(STRATEGIES).index(r.spec.strategy),
            r.spec.seed,
        ),
    )
    for run in ordered:
        summary = run.summary()
        rollbacks = summary["rollbacks"]
        cell = run.spec.cell
        lines.append(
            f"| {'none' if cell.is_clean else cell.attack} "
            f"| {cell.attackers_label} | {STRATEGIES[run.spec.strategy].title} | {run.spec.seed} "
            f"| {_fmt(summary['final_accuracy'])} "
            f"| {_fmt(summary['final_min_source_class_accuracy'])} "
            f"| {_fmt(summary['final_attack_success_rate'])} "
            f"| {_fmt(summary['mean_attacker_precision'], 2)} "
            f"| {_fmt(summary['mean_attacker_recall'], 2)} "
            f"| {_fmt(summary['mean_rejected'], 1)} "
            f"| {MISSING if rollbacks is None else rollbacks} |"
        )
    return "\n".join(lines)


def stake_note(runs: Sequence[RunResult]) -> list[str]:
    """Return the table's notes on stake cells: what share, and the run config it took.

    One line per stake cell and federation size among ``runs``; none without stake cells.
    """
    settings = sorted(
        {
            (r.spec.cell, r.spec.num_clients, r.spec.num_attackers, r.spec.attacker_stake)
            for r in runs
            if r.spec.attacker_stake_share is not None
        },
        key=lambda item: (item[0].sort_key(), item[1]),
    )
    return [
        f"- *{cell.label}*: the {attackers} attackers of {clients} clients hold"
        f" {share_label(cell.attacker_stake_share or 0.0)} of the initial stake together"
        f" (run config `attacker-stake` = {stake:g} per attacker, 1 per honest client). Only"
        " BCSFL uses stake (it draws validators and miners by stake); Flower's baselines"
        " ignore it, so for them this cell repeats the federation without a stake share."
        for cell, clients, attackers, stake in settings
    ]


def markdown_report(
    runs: Sequence[RunResult],
    *,
    title: str,
    commands: Sequence[str],
    setup: str,
    planned: int,
    failed: Mapping[str, str] | None = None,
) -> str:
    """Return ``table.md``: how it was made, the accuracy pivot, and the per-run table.

    Parameters
    ----------
    runs : Sequence[RunResult]
        Completed runs.
    title : str
        First heading.
    commands : Sequence[str]
        The command lines that made the runs (so anyone can re-run them), one per
        preset whose runs the report covers.
    setup : str
        One line describing the federation (clients, rounds, partitions, seeds).
    planned : int
        Number of runs in the grid, to say how many are missing.
    failed : Mapping[str, str], optional
        Run id -> error of runs that failed.
    """
    walls = [w for w in (run.summary()["wall_s"] for run in runs) if w is not None]
    scales = ", ".join(
        f"{attack} {scale:g}" for attack, scale in ATTACK_SCALES.items() if attack != LABEL_FLIP
    )
    parts = [
        f"# {title}",
        "",
        *_made_by(commands),
        "",
        f"{setup} Attack strengths (`attack-scale`): {scales}; label flipping maps "
        "y -> 9 - y on all of an attacker's data.",
        "",
        f"Runs: {len(runs)} of {planned} complete"
        + (
            f"; wall time per run {np.mean(walls) / 60:.1f} min on average "
            f"({min(walls) / 60:.1f} to {max(walls) / 60:.1f}), {sum(walls) / 3600:.2f} h in all."
            if walls
            else "."
        ),
        "",
        "## Final test accuracy",
        "",
        accuracy_pivot(runs) if runs else "(no completed runs)",
        "",
        "Each cell: the mean over the seeds run for it; with more than one seed, the range"
        " (min–max) and the number of seeds follow in brackets. A single number is one"
        " seed.",
        "",
        "## Every run",
        "",
        runs_table(runs),
        "",
        "- *min class acc*: lowest per-class test accuracy of the final model (every class is"
        " a source class of the y -> 9 - y flip, so the pooled source-class accuracy equals"
        " the test accuracy; this column shows the weakest class instead).",
        "- *ASR*: attack success rate, the share of test samples of class c classified as"
        " 9 - c by the final model (LFighter's definition over all source classes); shown"
        " for label-flipping and clean runs.",
        "- *precision*, *recall*: the rejections as an attacker detector, per round"
        " (caught / rejected, caught / attacking participants), averaged over the rounds"
        " where they are defined. Flower's baselines report no rejections (" + MISSING + ").",
        "- *rejected/round*: clients rejected per round on average; *rollbacks*: rounds whose"
        " candidate missed the 2/3 validator quorum and kept the previous model.",
        *stake_note(runs),
    ]
    if failed:
        parts += ["", "## Failed runs", ""]
        parts += [f"- `{run_id}`: {error}" for run_id, error in failed.items()]
    return "\n".join(parts) + "\n"


def _made_by(commands: Sequence[str]) -> list[str]:
    if len(commands) == 1:
        return [f"Made by `{commands[0]}`."]
    return [
        "Made by these commands, into this one directory (each resumes its own runs;"
        " with `--report-only` any of them rebuilds this report from all of them):",
        "",
        *(f"- `{command}`" for command in commands),
    ]
