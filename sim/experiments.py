"""Run the robustness grid as real Flower simulations and write its table and figures.

Every run is ``flwr run`` of this app (via :func:`bcsfl_vision.launch.run_federation`),
so the experiments exercise exactly the strategy code a user deploys. The grid is
resumable: finished runs are kept and skipped when the command is run again, so an
interrupted grid picks up where it stopped, and ``--report-only`` rebuilds the outputs
from the runs on disk.

Several presets can share an output directory (``full`` and ``seeds`` do): the report
of a directory covers the invocation's own runs and those of every other preset with
at least one completed run there, and names the command of each (see
:func:`report_parts`).

Usage::

    python -m sim.experiments --preset fast --out sim/results/fast    # 4 runs, minutes
    python -m sim.experiments --preset full --out sim/results/full    # 56 runs, hours
    python -m sim.experiments --preset seeds --out sim/results/full   # 40 more: seeds 43, 44
    python -m sim.experiments --preset full --out sim/results/full --list
    python -m sim.experiments --preset full --out sim/results/full --report-only
    python -m sim.experiments --preset full --dataset cifar10 --out sim/results/cifar10

Outputs in ``--out``: ``runs/<run_id>/`` (each run's ``results.json``, ``run.log``,
``spec.json``), ``rounds.csv``, ``summary.csv``, ``table.md`` and ``figures/*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path

from flwr.common.logger import log

from bcsfl_vision.config import DATA_DIR_ENV
from sim.figures import plot_grid
from sim.grid import PRESETS, STRATEGIES, ExperimentSpec, Preset
from sim.records import RunResult
from sim.report import markdown_report, write_rounds_csv, write_summary_csv
from sim.runner import RUNS_DIR, GridRunner

EXIT_OK = 0
EXIT_FAILED_RUNS = 1
EXIT_USAGE = 2


def check_data(dataset: str, data_dir: Path) -> int:
    """Load ``dataset``'s test split from ``data_dir`` once, before any run starts.

    A missing dataset would otherwise fail every run of the grid, one ServerApp start
    at a time; this fails at once with the loader's message (which files, where).

    Returns
    -------
    int
        Number of test samples found.

    Raises
    ------
    FileNotFoundError
        If the dataset is not in ``data_dir``.
    """
    from bcsfl_vision.task.data import load_split  # torch: only when runs are due

    return len(load_split(dataset, Path(data_dir).resolve(), train=False))


@dataclass(frozen=True)
class GridPart:
    """The runs of one preset in an output directory, and the command that makes them.

    Attributes
    ----------
    preset : Preset
        The preset (with the seeds it was asked for).
    specs : tuple[ExperimentSpec, ...]
        Its runs, in execution order.
    command : str
        The command line that makes (or resumes) these runs in the directory.
    """

    preset: Preset
    specs: tuple[ExperimentSpec, ...]
    command: str


def preset_command(name: str, out_dir: Path, dataset: str = "mnist") -> str:
    """Return the command that runs preset ``name`` with its defaults into ``out_dir``."""
    dataset_args = [] if dataset == "mnist" else ["--dataset", dataset]
    return shlex.join(
        ["python", "-m", "sim.experiments", "--preset", name, "--out", str(out_dir)] + dataset_args
    )


def report_parts(own: GridPart, runner: GridRunner, dataset: str = "mnist") -> list[GridPart]:
    """Return the parts that the report of ``runner``'s output directory covers.

    These are the invocation's own part and, for every preset of :data:`PRESETS`, its
    default runs (every strategy, the preset's seeds, ``dataset``) when at least one
    of them that ``own`` does not plan is complete in the directory. So a
    ``--preset seeds`` grid run into ``full``'s directory reports both presets, and so
    does ``--preset full --report-only`` there afterwards. Presets come in the order of
    :data:`PRESETS`, the invocation's own at its preset's place.

    Parameters
    ----------
    own : GridPart
        The runs the invocation plans and its command.
    runner : GridRunner
        Runner of the output directory (it tells complete runs).
    dataset : str
        Dataset of the invocation.
    """
    planned = set(own.specs)
    parts = []
    for name, preset in PRESETS.items():
        if name == own.preset.name:
            parts.append(own)
        others = [spec for spec in preset.specs(dataset) if spec not in planned]
        if any(runner.is_complete(spec) for spec in others):
            command = preset_command(name, runner.out_dir, dataset)
            parts.append(GridPart(preset, tuple(preset.specs(dataset)), command))
    return parts


def describe_setup(parts: Sequence[GridPart]) -> str:
    """Return the table's description of each part's federations (one sentence each)."""
    sentences = []
    for part in parts:
        strategies = {spec.strategy for spec in part.specs}
        cells = {spec.cell for spec in part.specs}
        seeds = sorted({spec.seed for spec in part.specs})
        preset = part.preset
        sentences.append(
            f"Preset `{preset.name}`: {len(strategies)} strategies x {len(cells)} cells,"
            f" {preset.num_clients} clients with Dirichlet(alpha={preset.dirichlet_alpha})"
            f" label-skewed partitions, {preset.num_rounds} rounds,"
            f" seed{'s' if len(seeds) > 1 else ''} {', '.join(str(seed) for seed in seeds)}."
        )
    return " ".join([*sentences, "Other settings are the app defaults of pyproject.toml."])


def write_outputs(
    out_dir: Path,
    parts: Sequence[GridPart],
    runner: GridRunner,
    *,
    dataset: str = "mnist",
    failed: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``rounds.csv``, ``summary.csv``, ``table.md`` and the figures for ``parts``.

    Every run of every part that :meth:`GridRunner.is_complete` accepts is reported
    (a run planned by two parts once); the table names each part's command.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = list(dict.fromkeys(spec for part in parts for spec in part.specs))
    runs = [RunResult.load(s, runner.run_dir(s)) for s in specs if runner.is_complete(s)]
    names = " + ".join(f"`{part.preset.name}`" for part in parts)
    table = out_dir / "table.md"
    table.write_text(
        markdown_report(
            runs,
            title=f"Robustness grid {names} on {dataset.upper()}",
            commands=[part.command for part in parts],
            setup=describe_setup(parts),
            planned=len(specs),
            failed=failed,
        )
    )
    return [
        write_rounds_csv(out_dir / "rounds.csv", runs),
        write_summary_csv(out_dir / "summary.csv", runs),
        table,
        *plot_grid(runs, out_dir / "figures"),
    ]


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, the dataset root every run of a grid reads."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get(DATA_DIR_ENV, "data")),
        help=f"dataset root (default: ${DATA_DIR_ENV} or ./data)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim.experiments", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="fast",
        help="which runs: fast (4 tiny runs), small (tuning), full (the grid), seeds "
        "(seeds 43 and 44 of full's decisive cells; give it full's --out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default sim/results/<preset>, or <preset>-<dataset> off MNIST)",
    )
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    add_data_dir_argument(parser)
    parser.add_argument(
        "--strategies", nargs="+", choices=list(STRATEGIES), help="run only these strategies"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every cell once per seed (default: the preset's, 42 or 43 44)",
    )
    parser.add_argument(
        "--timeout", type=float, default=7200.0, help="seconds before one run is stopped"
    )
    parser.add_argument(
        "--list", action="store_true", help="show the plan and its status, run nothing"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild CSV/table/figures from finished runs"
    )
    parser.add_argument("--stream", action="store_true", help="echo each run's log")
    return parser


def _reproducing(argv: Sequence[str]) -> list[str]:
    """Return ``argv`` without the flags that only change how outputs are made.

    The table says which command made its runs; a ``--report-only`` rebuild or a
    ``--stream`` echo made none, so they are left out and the command shown re-runs
    (or resumes) the grid.
    """
    return [arg for arg in argv if arg not in ("--report-only", "--stream")]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 if any run failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.seeds:
        preset = dataclasses.replace(preset, seeds=tuple(args.seeds))
    default_name = preset.name if args.dataset == "mnist" else f"{preset.name}-{args.dataset}"
    out_dir = args.out if args.out is not None else Path("sim") / "results" / default_name
    specs = preset.specs(args.dataset, tuple(args.strategies) if args.strategies else None)
    runner = GridRunner(out_dir, data_dir=args.data_dir, timeout=args.timeout, stream=args.stream)

    if args.list:
        for spec in specs:
            state = "done" if runner.is_complete(spec) else "to run"
            print(f"{state:>7}  {spec.run_id}")
        return EXIT_OK

    command = shlex.join(["python", "-m", "sim.experiments", *_reproducing(argv)])
    own = GridPart(preset, tuple(specs), command)
    failed: dict[str, str] = {}
    if not args.report_only:
        if not all(runner.is_complete(spec) for spec in specs):
            try:
                check_data(args.dataset, args.data_dir)
            except FileNotFoundError as err:
                log(ERROR, "%s", err)
                return EXIT_USAGE
        failed = runner.run(specs).failed
    parts = report_parts(own, runner, args.dataset)
    written = write_outputs(out_dir, parts, runner, dataset=args.dataset, failed=failed)
    log(
        INFO,
        "grid outputs: %s (runs of %s in %s)",
        ", ".join(str(p) for p in written),
        " + ".join(part.preset.name for part in parts),
        out_dir / RUNS_DIR,
    )
    return EXIT_FAILED_RUNS if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
