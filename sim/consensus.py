"""Consensus and anchoring cost vs number of nodes (after the BCS-FL paper's Figures 5, 6).

For ``N`` registered nodes, every round goes from "the round's model is decided" to
"its anchor has a receipt" exactly as the strategy does it: read the chain head and
prepare the :class:`~bcsfl_flower.approvals.RoundApproval`, have miners sign it (EIP-712,
dev keys), check the signatures and assemble the
:class:`~bcsfl_flower.chain.certificates.AnchorCertificate`, and send ``anchorRound`` to a
real anvil, which ``ecrecover``-s every signature again. Two quorums are compared:

``committee`` (ours)
    5 miners drawn by stake from the ``N`` nodes
    (:func:`~bcsfl_flower.committee.draw_committee`); ``ceil(2*5/3) = 4`` sign.
``all-nodes``
    every node is a miner (PBFT-style); ``ceil(2N/3)`` sign.

Measured per round: the time to prepare the approval, each signature (on one core,
one after the other), the certificate check, and ``anchorRound`` from sending to the
receipt, plus the gas used. Two latencies are reported:

- *sequential*: everything measured in this one process, end to end (signatures one
  after another, as the simulation's single machine does them);
- *parallel signing*: the slowest single signature instead of their sum, as when
  every miner signs on its own machine; network delay is not modelled (loopback).

Anchors per second is ``1000 / latency_ms``: a round links to the previous round's
hash, so anchors cannot be pipelined. The first round of every contract pays for
fresh storage slots and is left out of the summary (it is in ``rounds.csv``).

Usage::

    python -m sim.consensus --out sim/results/consensus            # 5..50 nodes, anvil
    python -m sim.consensus --nodes 5 10 --rounds 5 --out /tmp/consensus
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from logging import INFO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt
from eth_account.signers.local import LocalAccount
from flwr.common.logger import log

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import ChainConnection, connect
from bcsfl_flower.chain.certificates import AnchorCertificate, quorum
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.committee import draw_committee
from bcsfl_flower.packets import model_hash
from sim.bench_anchor import COMMITTEE, setup, toy_model
from sim.report import write_csv

COMMITTEE_MODE = "committee"
ALL_NODES_MODE = "all-nodes"
MODES = (COMMITTEE_MODE, ALL_NODES_MODE)
DEFAULT_NODES = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)


@dataclass(frozen=True)
class RoundTiming:
    """Costs of anchoring one round.

    Times are milliseconds; ``latency_ms`` is the sequential end-to-end latency and
    ``parallel_latency_ms`` the same with the slowest signature instead of their sum.
    """

    mode: str
    nodes: int
    round: int
    miners: int
    signatures: int
    prepare_ms: float
    sign_total_ms: float
    sign_max_ms: float
    verify_ms: float
    anchor_ms: float
    latency_ms: float
    parallel_latency_ms: float
    gas_used: int


@dataclass(frozen=True)
class PointSummary:
    """Medians over a (mode, nodes) point's steady-state rounds."""

    mode: str
    nodes: int
    miners: int
    signatures: int
    rounds: int
    latency_ms: float
    parallel_latency_ms: float
    anchors_per_s: float
    parallel_anchors_per_s: float
    gas_per_round: int


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _miners(mode: str, accounts: list[LocalAccount], head: bytes, round_number: int) -> list:
    if mode == ALL_NODES_MODE:
        return list(accounts)
    ids = [str(i) for i in range(len(accounts))]
    stakes = dict.fromkeys(ids, 1.0)  # equal stakes, as every client starts
    committee = draw_committee(stakes, ids, 0, COMMITTEE, head, round_number)
    return [accounts[int(i)] for i in committee.miners]


def anchor_one(
    trail: AuditTrail, mode: str, accounts: list[LocalAccount], round_number: int
) -> RoundTiming:
    """Anchor round ``round_number`` with ``mode``'s quorum and time every step."""
    started = time.perf_counter()
    _, head = trail.head()
    miners = _miners(mode, accounts, head, round_number)
    approval = trail.prepare_approval(
        round_number,
        model_hash(toy_model(float(round_number))),
        bytes(32),
        [m.address for m in miners],
    )
    prepare_ms = _ms(started)
    signers = miners[: quorum(len(miners))]  # the quorum that answers first
    signatures, sign_ms = {}, []
    for miner in signers:
        begun = time.perf_counter()
        signatures[miner.address] = approval.sign(miner, trail.domain)
        sign_ms.append(_ms(begun))
    begun = time.perf_counter()
    certificate = AnchorCertificate.build(
        approval, [m.address for m in miners], signatures, trail.domain
    )
    verify_ms = _ms(begun)
    begun = time.perf_counter()
    anchored = trail.anchor_round(certificate)
    anchor_ms = _ms(begun)
    fixed = prepare_ms + verify_ms + anchor_ms
    return RoundTiming(
        mode=mode,
        nodes=len(accounts),
        round=round_number,
        miners=len(miners),
        signatures=len(signers),
        prepare_ms=prepare_ms,
        sign_total_ms=sum(sign_ms),
        sign_max_ms=max(sign_ms),
        verify_ms=verify_ms,
        anchor_ms=anchor_ms,
        latency_ms=fixed + sum(sign_ms),
        parallel_latency_ms=fixed + max(sign_ms),
        gas_used=anchored.gas_used,
    )


def measure(
    connection: ChainConnection, node_counts: Sequence[int], rounds: int
) -> list[RoundTiming]:
    """Anchor ``rounds`` rounds per mode and node count, each point on its own contract.

    The points take turns round by round (round 1 of every point, then round 2, ...),
    so a burst of load from elsewhere on the machine hits all points alike instead of
    skewing whichever point happened to run during it.
    """
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 (the first one is warm-up), got {rounds}")
    for nodes in node_counts:
        if nodes < COMMITTEE:
            raise ValueError(f"node counts must be >= {COMMITTEE} (the committee), got {nodes}")
    points = []
    for nodes in node_counts:
        accounts = [client_dev_account(i) for i in range(nodes)]
        for mode in MODES:
            trail, _ = setup(connection, nodes)  # deploys and registers the N nodes
            points.append((mode, accounts, trail))
    timings = []
    for round_number in range(1, rounds + 1):
        for mode, accounts, trail in points:
            timings.append(anchor_one(trail, mode, accounts, round_number))
        log(INFO, "consensus: round %d/%d anchored at %d points", round_number, rounds, len(points))
    return timings


def summarise(timings: Sequence[RoundTiming]) -> list[PointSummary]:
    """Return medians per (mode, nodes) over the steady-state rounds (round >= 2)."""
    points: dict[tuple[str, int], list[RoundTiming]] = {}
    for timing in timings:
        if timing.round >= 2:
            points.setdefault((timing.mode, timing.nodes), []).append(timing)
    summaries = []
    for (mode, nodes), group in points.items():
        latency = statistics.median(t.latency_ms for t in group)
        parallel = statistics.median(t.parallel_latency_ms for t in group)
        summaries.append(
            PointSummary(
                mode=mode,
                nodes=nodes,
                miners=group[0].miners,
                signatures=group[0].signatures,
                rounds=len(group),
                latency_ms=latency,
                parallel_latency_ms=parallel,
                anchors_per_s=1000.0 / latency,
                parallel_anchors_per_s=1000.0 / parallel,
                gas_per_round=int(statistics.median(t.gas_used for t in group)),
            )
        )
    return summaries


def plot(summaries: Sequence[PointSummary], out_dir: Path) -> list[Path]:
    """Write the latency, throughput and gas figures; return their paths."""
    panels = [
        ("figure5_latency.png", "latency_ms", "parallel_latency_ms", "round end to receipt (ms)"),
        ("figure6_throughput.png", "anchors_per_s", "parallel_anchors_per_s", "anchors per second"),
        ("gas_per_round.png", "gas_per_round", None, "gas per anchored round"),
    ]
    colours = {COMMITTEE_MODE: "tab:blue", ALL_NODES_MODE: "tab:red"}
    labels = {COMMITTEE_MODE: "committee of 5 (ours)", ALL_NODES_MODE: "all nodes mine"}
    written = []
    for name, measured, parallel, ylabel in panels:
        figure, axis = plt.subplots(figsize=(5.5, 3.8))
        for mode in MODES:
            points = sorted((s for s in summaries if s.mode == mode), key=lambda s: s.nodes)
            x = [s.nodes for s in points]
            axis.plot(
                x,
                [getattr(s, measured) for s in points],
                "o-",
                color=colours[mode],
                label=labels[mode] + (" (sequential)" if parallel else ""),
            )
            if parallel:
                axis.plot(
                    x,
                    [getattr(s, parallel) for s in points],
                    "s--",
                    color=colours[mode],
                    alpha=0.6,
                    label=labels[mode] + " (parallel signing)",
                )
        axis.set_xlabel("nodes")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def markdown(
    summaries: Sequence[PointSummary], command: str, backend: str, machine: str = ""
) -> str:
    """Return the summary as Markdown, with the command that made it and the machine."""
    lines = [
        "# Anchoring cost vs number of nodes",
        "",
        f"Made by `{command}` on {backend}{machine}. Medians over the steady-state rounds "
        "(the first round of each contract is warm-up). See `sim/consensus.py` for "
        "what is timed. Absolute times depend on the machine; the ratios between the "
        "two quorums are what carry over.",
        "",
        "| mode | nodes | miners | signatures | latency ms (sequential) | "
        "latency ms (parallel signing) | anchors/s (sequential) | anchors/s (parallel) | "
        "gas/round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sorted(summaries, key=lambda s: (MODES.index(s.mode), s.nodes)):
        lines.append(
            f"| {s.mode} | {s.nodes} | {s.miners} | {s.signatures} | {s.latency_ms:.1f} | "
            f"{s.parallel_latency_ms:.1f} | {s.anchors_per_s:.1f} | "
            f"{s.parallel_anchors_per_s:.1f} | {s.gas_per_round} |"
        )
    return "\n".join(lines) + "\n"


def run(
    out_dir: Path, node_counts: Sequence[int], rounds: int, backend: str, command: str
) -> list[Path]:
    """Measure on a fresh chain of ``backend`` and write CSV, Markdown and figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # other jobs on the machine skew absolute times
    with tempfile.TemporaryDirectory() as scratch, connect(backend, Path(scratch)) as connection:
        timings = measure(connection, node_counts, rounds)
    machine = (
        f" ({os.cpu_count()} cores; 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after)"
    )
    summaries = summarise(timings)
    table = out_dir / "summary.md"
    table.write_text(markdown(summaries, command, backend, machine))
    return [
        write_csv(
            out_dir / "rounds.csv", [f.name for f in fields(RoundTiming)], map(asdict, timings)
        ),
        write_csv(
            out_dir / "summary.csv", [f.name for f in fields(PointSummary)], map(asdict, summaries)
        ),
        table,
        *plot(summaries, out_dir),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m sim.consensus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("sim") / "results" / "consensus")
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES))
    parser.add_argument(
        "--rounds", type=int, default=20, help="rounds per point (first is warm-up)"
    )
    parser.add_argument("--backend", default="anvil", help="anvil (default), embedded or a URL")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "sim.consensus", *argv])
    written = run(args.out, args.nodes, args.rounds, args.backend, command)
    log(INFO, "consensus outputs: %s", ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
