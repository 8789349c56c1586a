"""The DP frontier: what accuracy each privacy budget buys, for FedAvg and BCSFL.

Runs the robustness grid's federation (MNIST, 20 clients, Dirichlet(0.5), 20 rounds,
seed 42) with every client training under Opacus DP-SGD (expected batch 256, learning
rate 0.4: see :data:`DP_BATCH_SIZE`), at several noise multipliers,
clean and with 30% label flippers, as real ``flwr run`` simulations. Each run's epsilon
is the largest any client spent by the last round (at the app's ``dp-delta``, 1e-5),
so a point of the frontier is (epsilon, final test accuracy).

::

    python -m sim.dp_frontier                          # every strategy, every noise level
    python -m sim.dp_frontier --strategies fedavg      # resumes; finished runs are reused
    python -m sim.dp_frontier --report-only            # rebuild frontier.md/.csv/.png

Outputs in ``--out`` (default ``sim/results/dp_frontier``): ``frontier.md`` (the table
and the command that made it), ``frontier.csv`` and ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt
from flwr.common.logger import log

from sim.experiments import add_data_dir_argument
from sim.grid import CLEAN, LABEL_FLIP, STRATEGIES, Cell, ExperimentSpec
from sim.records import RunResult
from sim.report import write_csv
from sim.runner import GridRunner

NOISE_MULTIPLIERS = (1.5, 2.0, 3.0)
"""DP-SGD noise multipliers of the frontier, least private first (epsilon about 11, 7.5
and 4.5 after 20 rounds at :data:`DP_BATCH_SIZE`)."""

DP_BATCH_SIZE = 256
"""Clients' expected batch size under DP-SGD.

The noise on an averaged gradient is ``noise_multiplier * max_grad_norm / batch``, so a
large batch buys a much smaller noise for the same epsilon: per round a client takes
fewer, larger and far less noisy steps. Measured with FedAvg on the clean cell, at
epsilon 6.7-7.5: batch 32 (the app's default) gives 0.891, batch 128 gives 0.924 and
batch 256 gives 0.939."""

DP_LEARNING_RATE = 0.4
"""Clients' SGD learning rate under DP-SGD, scaled up with :data:`DP_BATCH_SIZE` (the
app's default is 0.05 for batch 32): fewer steps per round need larger ones."""

FRONTIER_STRATEGIES = ("fedavg", "bcsfl")
FRONTIER_CELLS = (CLEAN, Cell(LABEL_FLIP, 0.3))
FRONTIER_COLUMNS = (
    "run_id",
    "strategy",
    "attacker_fraction",
    "noise_multiplier",
    "epsilon",
    "final_accuracy",
    "committed_rounds",
    "num_rounds",
)


@dataclass(frozen=True)
class FrontierPoint:
    """One finished run of the frontier.

    Attributes
    ----------
    spec : ExperimentSpec
        The run.
    epsilon : float | None
        Largest epsilon any client had spent after the last round (None if unreported).
    accuracy : float | None
        Final test accuracy.
    committed : int | None
        Rounds that committed a model (BCSFL only; None for Flower's strategies).
    """

    spec: ExperimentSpec
    epsilon: float | None
    accuracy: float | None
    committed: int | None

    @classmethod
    def of(cls, run: RunResult) -> FrontierPoint:
        """Read the point from a finished run's results."""
        last = run.rounds[-1] if run.rounds else {}
        summary = run.summary()
        rollbacks = summary["rollbacks"]
        return cls(
            spec=run.spec,
            epsilon=last.get("max_dp_epsilon"),
            accuracy=summary["final_accuracy"],
            committed=None if rollbacks is None else run.spec.num_rounds - rollbacks,
        )

    def row(self) -> dict[str, object]:
        """Return the point as a row of ``frontier.csv``."""
        return {
            "run_id": self.spec.run_id,
            "strategy": self.spec.strategy,
            "attacker_fraction": self.spec.attacker_fraction,
            "noise_multiplier": self.spec.dp_noise_multiplier,
            "epsilon": self.epsilon,
            "final_accuracy": self.accuracy,
            "committed_rounds": self.committed,
            "num_rounds": self.spec.num_rounds,
        }


def frontier_specs(
    strategies: Sequence[str] = FRONTIER_STRATEGIES,
    noise_multipliers: Sequence[float] = NOISE_MULTIPLIERS,
    seed: int = 42,
) -> list[ExperimentSpec]:
    """Return the frontier's runs: every noise level, cell and strategy."""
    return [
        ExperimentSpec(
            strategy=strategy,
            attack=cell.attack,
            attacker_fraction=cell.attacker_fraction,
            seed=seed,
            dp_noise_multiplier=noise,
            batch_size=DP_BATCH_SIZE,
            learning_rate=DP_LEARNING_RATE,
        )
        for noise in noise_multipliers
        for cell in FRONTIER_CELLS
        for strategy in strategies
    ]


def frontier_table(points: Sequence[FrontierPoint]) -> str:
    """Return the Markdown table: one row per run, by strategy, cell and noise."""
    lines = [
        "| strategy | attackers | noise multiplier | epsilon (delta 1e-5) | final accuracy "
        "| committed rounds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for point in sorted(points, key=_order):
        spec = point.spec
        committed = "—" if point.committed is None else f"{point.committed}/{spec.num_rounds}"
        lines.append(
            f"| {STRATEGIES[spec.strategy].title} | {spec.percent}% | "
            f"{spec.dp_noise_multiplier:g} | {_number(point.epsilon, 2)} | "
            f"{_number(point.accuracy, 3)} | {committed} |"
        )
    return "\n".join(lines)


def plot_frontier(points: Sequence[FrontierPoint], path: Path) -> Path:
    """Plot final accuracy against epsilon, a line per strategy and cell."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    series: dict[tuple[str, int], list[FrontierPoint]] = {}
    for point in points:
        if point.epsilon is not None and point.accuracy is not None:
            series.setdefault((point.spec.strategy, point.spec.percent), []).append(point)
    for (strategy, percent), members in sorted(series.items()):
        members.sort(key=lambda p: p.epsilon)  # type: ignore[arg-type, return-value]
        axes.plot(
            [p.epsilon for p in members],
            [p.accuracy for p in members],
            marker="o",
            linestyle="-" if percent == 0 else "--",
            label=f"{STRATEGIES[strategy].title}, {'clean' if percent == 0 else f'{percent}% LF'}",
        )
    axes.set_xlabel("epsilon (delta 1e-5), largest over clients")
    axes.set_ylabel("final test accuracy")
    axes.set_title("DP frontier: MNIST, 20 clients, Dirichlet(0.5), 20 rounds")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_frontier(out_dir: Path, points: Sequence[FrontierPoint], command: str) -> list[Path]:
    """Write ``frontier.md``, ``frontier.csv`` and ``accuracy_vs_epsilon.png``."""
    ordered = sorted(points, key=_order)
    table = out_dir / "frontier.md"
    table.write_text(
        "# DP frontier on MNIST\n\n"
        f"Made by `{command}` (resumable; `--report-only` rebuilds this report).\n\n"
        "20 clients with Dirichlet(0.5) partitions, 20 rounds, seed 42, every client "
        "training with Opacus DP-SGD (per-sample clipping at `dp-max-grad-norm` 1.0, RDP "
        f"accountant, Poisson sampling, expected batch {DP_BATCH_SIZE}, learning rate "
        f"{DP_LEARNING_RATE}); epsilon is the largest any client had spent after "
        "the last round.\n\n" + frontier_table(ordered) + "\n"
    )
    csv = write_csv(out_dir / "frontier.csv", FRONTIER_COLUMNS, (p.row() for p in ordered))
    return [table, csv, plot_frontier(ordered, out_dir / "accuracy_vs_epsilon.png")]


def _order(point: FrontierPoint) -> tuple[int, float, float]:
    spec = point.spec
    return (
        list(STRATEGIES).index(spec.strategy),
        spec.attacker_fraction,
        spec.dp_noise_multiplier or 0.0,
    )


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim.dp_frontier", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("sim/results/dp_frontier"))
    add_data_dir_argument(parser)
    parser.add_argument(
        "--strategies", nargs="+", choices=list(STRATEGIES), default=list(FRONTIER_STRATEGIES)
    )
    parser.add_argument(
        "--noise", type=float, nargs="+", default=list(NOISE_MULTIPLIERS), help="noise multipliers"
    )
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--report-only", action="store_true", help="rebuild the report only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the frontier and write its report; 1 if a run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    specs = frontier_specs(args.strategies, args.noise)
    runner = GridRunner(args.out, data_dir=args.data_dir, timeout=args.timeout)
    failed = {} if args.report_only else runner.run(specs).failed
    every = frontier_specs(tuple(STRATEGIES), sorted({*NOISE_MULTIPLIERS, *args.noise}))
    points = [
        FrontierPoint.of(RunResult.load(spec, runner.run_dir(spec)))
        for spec in every
        if runner.is_complete(spec)
    ]
    reproducing = [arg for arg in argv if arg != "--report-only"]
    command = shlex.join(["python", "-m", "sim.dp_frontier", *reproducing])
    written = write_frontier(args.out, points, command)
    log(INFO, "dp frontier: %d runs reported in %s", len(points), ", ".join(map(str, written)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
