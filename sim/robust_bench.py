"""The fast decision-quality bench: every aggregator against every attack, in process.

Real MNIST, real local training, 20 clients, through the public Strategy API (see
:mod:`sim.robust.federation`). Resumable: each finished run is stored as
``<out>/runs/<run id>.json`` and never recomputed; the report is rebuilt from the
stored runs after every run.

Usage::

    python -m sim.robust_bench --preset logreg --out sim/results/robust   # LR: the whole matrix
    python -m sim.robust_bench --preset cnn --out sim/results/robust      # the CNN's cells
    python -m sim.robust_bench --preset quick --out /tmp/quick            # minutes of feedback
    python -m sim.robust_bench --out sim/results/robust --report-only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.common.logger import FLOWER_LOGGER
from flwr.supercore.task_identity import TaskIdentity
from threadpoolctl import threadpool_limits

from sim.robust.attacks import ATTACKS
from sim.robust.contenders import BASELINES, CONTENDERS
from sim.robust.federation import Cell, run_cell
from sim.robust.report import write_report
from sim.robust.tasks import build_federation

ALL_ATTACKS = tuple(a for a in ATTACKS if a != "clean")
CNN_ATTACKS = ("label-flip", "alie", "opt-ipm", "mimic", "sign-flip", "backdoor", "on-off")
CNN_CONTENDERS = ("fedavg", "multikrum", "centered-clipping", "arc-nnm-trmean", "bcsfl")


@dataclass(frozen=True)
class Preset:
    """A matrix of cells."""

    model: str
    alphas: tuple[float | None, ...]
    shares: tuple[float, ...]
    attacks: tuple[str, ...]
    contenders: tuple[str, ...]
    seeds: tuple[int, ...]
    rounds: int = 20
    max_train: int | None = None

    def cells(self) -> Iterator[Cell]:
        """Yield every cell: clean once per skew, then every attack at every share."""
        for seed in self.seeds:
            for alpha in self.alphas:
                plan = [("clean", 0.0)] + [(a, s) for s in self.shares for a in self.attacks]
                for attack, share in plan:
                    for contender in self.contenders:
                        yield Cell(
                            self.model,
                            alpha,
                            attack,
                            share,
                            contender,
                            seed,
                            rounds=self.rounds,
                            max_train=self.max_train,
                        )


PRESETS = {
    "logreg": Preset(
        "logreg", (0.1, 0.5, None), (0.2, 0.3), ALL_ATTACKS, tuple(CONTENDERS), (42, 43, 44)
    ),
    "cnn": Preset("cnn", (0.1, 0.5), (0.3,), CNN_ATTACKS, CNN_CONTENDERS, (42, 43, 44)),
    "quick": Preset(
        "logreg",
        (0.1, 0.5),
        (0.3,),
        ("label-flip", "alie", "mimic", "sign-flip", "backdoor", "on-off"),
        ("fedavg", "bcsfl"),
        (42,),
    ),
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("sim/results/robust"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--strategies", nargs="+", choices=sorted(CONTENDERS))
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS))
    parser.add_argument("--alphas", nargs="+", help="Dirichlet alphas; 'iid' for an IID split")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def _select(preset: Preset, args: argparse.Namespace) -> list[Cell]:
    alphas = (
        None if args.alphas is None else {None if a == "iid" else float(a) for a in args.alphas}
    )
    cells = []
    for cell in preset.cells():
        if args.seeds and cell.seed not in args.seeds:
            continue
        if args.strategies and cell.strategy not in args.strategies:
            continue
        if args.attacks and cell.attack not in args.attacks:
            continue
        if alphas is not None and cell.alpha not in alphas:
            continue
        if args.rounds:
            cell = Cell(**{**cell.__dict__, "rounds": args.rounds})
        cells.append(cell)
    return cells


@contextmanager
def _bench_process() -> Iterator[None]:
    """Quiet Flower, give messages a task identity and use one thread, then restore.

    The strategies build Flower messages, which need a task identity (a run sets one).
    Restoring matters when the bench runs inside another process (its tests do): a
    logger left at WARNING silences every later log record of Flower's.
    """
    level = FLOWER_LOGGER.level
    # The private fields: the public getters raise while no identity is set.
    fields = ("_run_id", "_node_id", "_task_id")
    identity = [getattr(TaskIdentity, name) for name in fields]
    threads = torch.get_num_threads()
    FLOWER_LOGGER.setLevel(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)
    try:
        yield
    finally:
        FLOWER_LOGGER.setLevel(level)
        for name, value in zip(fields, identity, strict=True):
            setattr(TaskIdentity, name, value)
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preset's missing cells, then write the report."""
    args = _parse(argv)
    made_by = "python -m sim.robust_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    contenders = (*BASELINES, "bcsfl")
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cells = [] if args.report_only else _select(PRESETS[args.preset], args)
    todo = [c for c in cells if not (runs / f"{c.run_id}.json").exists()]
    print(f"{len(cells) - len(todo)} of {len(cells)} runs done, {len(todo)} to run", flush=True)
    federations: dict[tuple, object] = {}
    started = time.perf_counter()
    with _bench_process(), threadpool_limits(limits=1):
        for index, cell in enumerate(todo, 1):
            key = (cell.alpha, cell.seed, cell.clients, cell.max_train)
            if key not in federations:
                federations = {
                    key: build_federation(
                        args.data_dir, cell.clients, cell.alpha, cell.seed, cell.max_train
                    )
                }
            result = run_cell(cell, args.data_dir, federations[key])
            (runs / f"{cell.run_id}.json").write_text(json.dumps(result))
            elapsed = time.perf_counter() - started
            print(
                f"[{index}/{len(todo)}] {cell.run_id}: accuracy "
                f"{result['rounds'][-1]['accuracy']:.3f} ({result['wall_s']:.1f} s; "
                f"ETA {elapsed / index * (len(todo) - index) / 60:.0f} min)",
                flush=True,
            )
    write_report(args.out, contenders, made_by)
    print(f"report: {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
