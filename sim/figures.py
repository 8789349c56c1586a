"""Figures of a grid, after the BCS-FL paper's Figure 4.

One PNG per attack: a panel per strategy, test accuracy per round, a line per attacker
fraction. The clean run (0% attackers) is the reference line of every attack. A
second PNG for label flipping shows the attack success rate per round the same way.
Cells with several seeds are drawn as the mean over seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sim.grid import LABEL_FLIP, STRATEGIES  # noqa: E402
from sim.records import RunResult  # noqa: E402

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


def plot_attack(
    runs: Sequence[RunResult], attack: str, path: Path, *, metric: str = "test_accuracy"
) -> Path | None:
    """Draw ``metric`` per round for ``attack``: a panel per strategy, a line per fraction.

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

    Returns
    -------
    Path | None
        ``path``, or None when no run of ``attack`` with attackers exists.
    """
    if not any(r.spec.attack == attack and r.spec.attacker_fraction > 0 for r in runs):
        return None
    lines: dict[str, dict[float, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        clean = run.spec.attacker_fraction == 0 and run.spec.attack == LABEL_FLIP
        if run.spec.attack == attack or clean:
            lines[run.spec.strategy][run.spec.attacker_fraction].append(run)
    strategies = [s for s in STRATEGIES if s in lines]
    columns = min(PANEL_COLUMNS, len(strategies))
    rows = math.ceil(len(strategies) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.6 * columns, 2.9 * rows), sharex=True, sharey=True, squeeze=False
    )
    fractions = sorted({f for by_fraction in lines.values() for f in by_fraction})
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(fractions), 2)))
    handles: dict[float, Line2D] = {}
    for axis, strategy in zip(axes.flat, strategies, strict=False):
        for colour, fraction in zip(colours, fractions, strict=False):
            if fraction not in lines[strategy]:
                continue
            x, y = _mean_over_seeds(lines[strategy][fraction], metric)
            (handles[fraction],) = axis.plot(x, y, marker="o", markersize=3, color=colour)
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
    ordered = sorted(handles)
    figure.legend(
        [handles[f] for f in ordered],
        [f"{f:.0%}" for f in ordered],
        title="attackers",
        loc="lower center",
        ncol=len(ordered),
    )
    figure.suptitle(f"{ylabel} per round under {attack}")
    figure.tight_layout(rect=(0.0, 0.1 / rows + 0.04, 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_grid(runs: Sequence[RunResult], figures_dir: Path) -> list[Path]:
    """Write every figure of the grid into ``figures_dir`` and return their paths.

    ``accuracy_<attack>.png`` for each attack with attackers, and
    ``asr_label-flip.png`` for label flipping.
    """
    attacks = sorted({r.spec.attack for r in runs if r.spec.attacker_fraction > 0})
    written = [
        plot_attack(runs, attack, figures_dir / f"accuracy_{attack}.png") for attack in attacks
    ]
    written.append(
        plot_attack(
            runs, LABEL_FLIP, figures_dir / f"asr_{LABEL_FLIP}.png", metric="attack_success_rate"
        )
    )
    return [path for path in written if path is not None]
