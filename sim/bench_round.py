"""Benchmark: a BCSFL round's wall time against a FedAvg round, in the same ``flwr run`` setup.

Each run is a real ``flwr run`` federation on Flower's simulation engine (MNIST, 20
clients, 5 rounds by default). What is compared is Flower's own measurement of the
rounds, the ``Strategy execution finished in X s`` line that ``Strategy.start`` logs:
it spans the initial evaluation and every round (training, the decision, for BCSFL the
committee exchange and anchoring, and the central evaluation), and leaves out what both
runs pay once (starting the SuperLink and Ray, deploying the audit contract).

Two apps:

* ``package`` (default): this package's example app, run config ``strategy=bcsfl`` (with
  the embedded chain, signing and mining) against ``strategy=fedavg``;
* ``dropin``: the plain PyTorch app of ``tests/dropin_app``, whose only BCS-FL line is
  ``BCSFL(...)``, against a copy with that line put back to ``FedAvg(...)``: what a user
  who swaps the strategy sees;
* ``dropin-mod``: the same, with the second line a user can change,
  ``app = bcsfl_client_app()`` in its ClientApp, on the BCSFL side only (no audit
  trail: the mod serves its committee duty in one message per validator).

Runs alternate (BCSFL first in even repetitions, FedAvg first in odd ones) so that
outside load hits both alike; the ratio compares medians. The last line is
``BCSFL/FedAvg round wall X.XXx``.

With ``--fraction-train`` below 1 (package app only), a cross-device federation: each
round samples that share of ``--clients``. The bench then also reports, from each run's
``results.json``, the peak ServerApp memory, the final accuracy, BCSFL's rollbacks and
its decision and committee time, checks that every client not sampled in a round kept
its stake, and the last line names the setting, e.g.
``BCSFL/FedAvg round wall 1.04x (1000 clients, 5% sampled)``.

Usage::

    python sim/bench_round.py                       # package app, 20 clients, 5 rounds
    python sim/bench_round.py --clients 1000 --fraction-train 0.05 --dirichlet-alpha 1 --repeats 1
    python sim/bench_round.py --app dropin --repeats 3
    python sim/bench_round.py --app dropin-mod
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bcsfl_vision.launch import APP_DIR, run_federation

DROPIN_DIR = Path(__file__).resolve().parent.parent / "tests" / "dropin_app"
BCSFL_LINE = "strategy = BCSFL(fraction_train=fraction_train)"
FEDAVG_LINE = "strategy = FedAvg(fraction_train=fraction_train)"
BCSFL_IMPORT = "from bcsfl_flower.strategy import BCSFL"
CLIENTAPP_IMPORT = "from flwr.clientapp import ClientApp"
MOD_IMPORT = "from bcsfl_flower.client.mod import bcsfl_client_app"
STRATEGY_WALL = re.compile(r"Strategy execution finished in ([0-9.]+)s")


def strategy_wall_s(log_text: str) -> float:
    """Return the seconds of Flower's ``Strategy execution finished in`` line.

    Raises
    ------
    ValueError
        If the log has no such line (the run did not finish its rounds).
    """
    found = STRATEGY_WALL.findall(log_text)
    if not found:
        raise ValueError("the run log has no 'Strategy execution finished in' line")
    return float(found[-1])


def edited_copy_of_dropin(target: Path, module: str, edits: dict[str, str]) -> Path:
    """Copy the drop-in app to ``target``, replacing text in one of its modules.

    Raises
    ------
    ValueError
        If a text to replace is no longer in the module.
    """
    shutil.copytree(DROPIN_DIR, target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / "dropin_app" / module
    text = path.read_text()
    for old, new in edits.items():
        if old not in text:
            raise ValueError(f"{path} no longer contains {old!r}")
        text = text.replace(old, new)
    path.write_text(text)
    return target


def dropin_app_dir(app: str, strategy: str, workdir: Path) -> Path:
    """Return the drop-in app (or an edited copy) that ``app`` runs with ``strategy``."""
    if strategy == "fedavg":
        return edited_copy_of_dropin(
            workdir / "dropin_fedavg",
            "server_app.py",
            {BCSFL_LINE: FEDAVG_LINE, BCSFL_IMPORT: "from flwr.serverapp.strategy import FedAvg"},
        )
    if app == "dropin-mod":
        return edited_copy_of_dropin(
            workdir / "dropin_mod",
            "client_app.py",
            {"app = ClientApp()": "app = bcsfl_client_app()", CLIENTAPP_IMPORT: MOD_IMPORT},
        )
    return DROPIN_DIR


def run_once(
    app: str, strategy: str, workdir: Path, args: argparse.Namespace, index: int
) -> tuple[float, float, dict | None]:
    """Run one federation; return its strategy and ``flwr run`` walls, and its results.

    Walls are in seconds; the results are ``results.json`` (None for the drop-in apps,
    which write none).
    """
    output_dir = workdir / f"{app}-{strategy}-{index}"
    run_config: dict[str, object] = {"num-server-rounds": args.rounds}
    if app == "package":
        app_dir, require_results = APP_DIR, True
        run_config.update(
            {
                "strategy": strategy,
                "seed": args.seed,
                "fraction-train": args.fraction_train,
                "dirichlet-alpha": args.dirichlet_alpha,
            }
        )
    else:
        app_dir, require_results = dropin_app_dir(app, strategy, output_dir), False
    started = time.perf_counter()
    run = run_federation(
        output_dir,
        num_supernodes=args.clients,
        app_dir=app_dir,
        run_config=run_config,
        data_dir=args.data_dir,
        stream=False,
        require_results=require_results,
    )
    whole = time.perf_counter() - started
    return strategy_wall_s(run.log_path.read_text()), whole, run.results


def run_summary(results: dict) -> dict[str, float]:
    """Return what a cross-device run reports: memory, accuracy, rollbacks, stage times.

    ``kept_stakes_broken`` counts clients that were not sampled in a round yet whose
    stake changed in it (it must be 0: stake is the federation's memory).
    """
    rounds = [r for key, r in sorted(results["rounds"].items(), key=lambda i: int(i[0]))]
    trained = [r for r in rounds if r.get("round", 0) >= 1 and "clients" in r]
    timing = [r.get("timing", {}) for r in trained[1:]] or [{}]  # round 1 also starts Ray
    broken = 0
    for record in trained:
        before, after = record.get("stakes_before", {}), record.get("stakes", {})
        sampled = set(record.get("clients", {}))
        broken += sum(1 for n, s in before.items() if n not in sampled and after.get(n) != s)
    return {
        "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in rounds),
        "accuracy": float(results.get("final_test_accuracy", float("nan"))),
        "rollbacks": sum(r.get("outcome") == "rollback" for r in trained),
        "decision_s": statistics.median(t.get("decision_s", 0.0) for t in timing),
        "committee_s": statistics.median(t.get("committee_s", 0.0) for t in timing),
        "kept_stakes_broken": broken,
    }


def main() -> int:
    """Alternate BCSFL and FedAvg runs and print the ratio of their round wall times."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=("package", "dropin", "dropin-mod"), default="package")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory")
    parser.add_argument(
        "--fraction-train", type=float, default=1.0, help="share of clients sampled per round"
    )
    parser.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=0.5,
        help="label skew of the package app's partitions (1000 clients need >= 1: with 60 "
        "MNIST samples each on average, alpha 0.5 cannot give every one the 20 it needs)",
    )
    args = parser.parse_args()
    if args.fraction_train < 1.0 and args.app != "package":
        parser.error("--fraction-train needs --app package (the drop-in apps fix it at 1)")

    walls: dict[str, list[float]] = {"bcsfl": [], "fedavg": []}
    wholes: dict[str, list[float]] = {"bcsfl": [], "fedavg": []}
    with tempfile.TemporaryDirectory(prefix="bench_round_") as scratch:
        workdir = args.keep or Path(scratch)
        for index in range(args.repeats):
            order = ("bcsfl", "fedavg") if index % 2 == 0 else ("fedavg", "bcsfl")
            for strategy in order:
                wall, whole, results = run_once(args.app, strategy, workdir, args, index)
                walls[strategy].append(wall)
                wholes[strategy].append(whole)
                print(
                    f"{args.app} {strategy:6s} run {index}: strategy {wall:7.1f} s "
                    f"({wall / args.rounds:5.2f} s/round), flwr run {whole:7.1f} s",
                    flush=True,
                )
                if results is not None and args.fraction_train < 1.0:
                    summary = run_summary(results)
                    print("  " + ", ".join(f"{k} {v:g}" for k, v in summary.items()), flush=True)
    per_round = {name: statistics.median(values) / args.rounds for name, values in walls.items()}
    whole_ratio = statistics.median(wholes["bcsfl"]) / statistics.median(wholes["fedavg"])
    print(
        f"{args.app} app, {args.clients} clients, {args.rounds} rounds, {args.repeats} repeats: "
        f"BCSFL {per_round['bcsfl']:.2f} s/round, FedAvg {per_round['fedavg']:.2f} s/round; "
        f"whole flwr run {whole_ratio:.2f}x"
    )
    setting = (
        f" ({args.clients} clients, {100 * args.fraction_train:g}% sampled)"
        if args.fraction_train < 1.0
        else ""
    )
    print(f"BCSFL/FedAvg round wall {per_round['bcsfl'] / per_round['fedavg']:.2f}x{setting}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
