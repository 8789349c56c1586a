"""Figures of a grid, after the BCS-FL paper's Figure 4.

One PNG per attack: a panel per strategy, test accuracy per round, a line per attacker
fraction (and a dashed one per stake cell, e.g. 50% of the clients holding 1/3 of the
stake). The clean run (0% attackers) is the reference line of every attack. A second
PNG for label flipping shows the attack success rate per round the same way. The grid's
figures draw one seed, the one most runs have (42 in ``sim/results/full``), and say so
in their titles; the spread over seeds is in ``table.md``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from sim.grid import LABEL_FLIP, STRATEGIES, Cell
from sim.records import RunResult

PANEL_COLUMNS = 4


def _series(run: RunResult, metric: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [row for row in run.round_rows() if row[metric] is not None]
    return (
        np.array([row["round"] for row in rows], dtype=int),
        np.array([row[metric] for row in rows], dtype=float),
    )


def _mean_over_seeds(runs: Sequence[RunResult], metric: str) -> tuple[np.ndarray, np.ndarray]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for x, y in zip(*_series(run, metric), strict=True):
            by_round[int(x)].append(float(y))
    rounds = np.array(sorted(by_round), dtype=int)
    return rounds, np.array([np.mean(by_round[r]) for r in rounds], dtype=float)


def figure_seed(runs: Sequence[RunResult]) -> int | None:
    """Return the seed the grid's figures draw: the one with most runs (smallest on a tie).

    In a directory with the ``full`` and ``seeds`` presets that is 42, the seed every
    cell and strategy was run with; None when there are no runs.
    """
    counts = Counter(run.spec.seed for run in runs)
    return min(counts, key=lambda seed: (-counts[seed], seed)) if counts else None


def plot_attack(
    runs: Sequence[RunResult],
    attack: str,
    path: Path,
    *,
    metric: str = "test_accuracy",
    seed: int | None = None,
) -> Path | None:
    """Draw ``metric`` per round for ``attack``: a panel per strategy, a line per cell.

    A line per attacker fraction, and one more (dashed) per stake cell; the clean run
    is the 0% line.

    Parameters
    ----------
    runs : Sequence[RunResult]
        Completed runs of the grid; the attack's runs and the clean runs are used.
    attack : str
        The attack whose figure this is.
    path : Path
        PNG file to write.
    metric : str
        A column of :data:`~sim.records.ROUND_COLUMNS` (``"test_accuracy"`` or
        ``"attack_success_rate"``).
    seed : int, optional
        Draw only the runs of this seed; by default each line is the mean over the
        seeds its cell was run with. The title says which.

    Returns
    -------
    Path | None
        ``path``, or None when no run of ``attack`` with attackers exists.
    """
    if seed is not None:
        runs = [run for run in runs if run.spec.seed == seed]
    if not any(r.spec.attack == attack and not r.spec.cell.is_clean for r in runs):
        return None
    lines: dict[str, dict[Cell, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        cell = run.spec.cell
        if cell.is_clean or cell.attack == attack:
            lines[run.spec.strategy][cell].append(run)
    strategies = [s for s in STRATEGIES if s in lines]
    columns = min(PANEL_COLUMNS, len(strategies))
    rows = math.ceil(len(strategies) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 2.9 * rows), sharex=True, sharey=True, squeeze=False
    )
    cells = sorted({cell for by_cell in lines.values() for cell in by_cell}, key=Cell.sort_key)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(cells), 2)))
    handles: dict[Cell, Line2D] = {}
    for axis, strategy in zip(axes.flat, strategies, strict=False):
        for colour, cell in zip(colours, cells, strict=False):
            if cell not in lines[strategy]:
                continue
            x, y = _mean_over_seeds(lines[strategy][cell], metric)
            style = "--" if cell.attacker_stake_share is not None else "-"
            (handles[cell],) = axis.plot(
                x, y, marker="o", markersize=3, color=colour, linestyle=style
            )
        axis.set_title(STRATEGIES[strategy].title)
        axis.set_ylim(0.0, 1.0)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(strategies) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("round")
    ylabel = "test accuracy" if metric == "test_accuracy" else metric.replace("_", " ")
    for axis in axes[:, 0]:
        axis.set_ylabel(ylabel)
    ordered = [cell for cell in cells if cell in handles]
    figure.legend(
        [handles[cell] for cell in ordered],
        [cell.attackers_label for cell in ordered],
        title="attackers",
        loc="lower center",
        ncol=len(ordered),
    )
    seeds = f"seed {seed}" if seed is not None else "mean over seeds"
    figure.suptitle(f"{ylabel} per round under {attack} ({seeds})")
    figure.tight_layout(rect=(0.0, 0.1 / rows + 0.04, 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_grid(runs: Sequence[RunResult], figures_dir: Path) -> list[Path]:
    """Write every figure of the grid into ``figures_dir`` and return their paths.

    ``accuracy_<attack>.png`` for each attack with attackers, and
    ``asr_label-flip.png`` for label flipping, all drawn from the runs of one seed
    (:func:`figure_seed`), so every line is one federation as in the paper's figure.
    """
    seed = figure_seed(runs)
    attacks = sorted({r.spec.attack for r in runs if not r.spec.cell.is_clean})
    written = [
        plot_attack(runs, attack, figures_dir / f"accuracy_{attack}.png", seed=seed)
        for attack in attacks
    ]
    written.append(
        plot_attack(
            runs,
            LABEL_FLIP,
            figures_dir / f"asr_{LABEL_FLIP}.png",
            metric="attack_success_rate",
            seed=seed,
        )
    )
    return [path for path in written if path is not None]
