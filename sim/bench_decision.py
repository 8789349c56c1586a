"""Benchmark: the server-side cost of deciding one round, BCSFL against FedAvg and MultiKrum.

For each federation size, every strategy decides the same round: ``configure_train``
then ``aggregate_train`` on the same train replies (a 1M-parameter model, float32), as
Flower's ``start`` calls them. BCSFL's validators answer instantly (a fake grid that
replies with a fixed loss without evaluating anything), so what is timed is the
server's own work: checks, bounds, screening, committee, candidates, decision and
stakes. BCSFL runs without an audit chain, as the other two have none. MultiKrum is
configured as in the grid (:func:`bcsfl_vision.baselines.build_baseline`, 30% assumed
attackers, keeping ``n - f`` updates).

Strategies run interleaved, repetition by repetition, so that outside load hits all of
them alike; each ratio compares medians. The last line is the worst ratio over the sizes.

Usage::

    python sim/bench_decision.py                 # 20 and 100 clients, 1M parameters
    python sim/bench_decision.py --clients 20 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bcsfl_flower.protocol import BASELINE_CANDIDATE, CANDIDATE_CONFIG_KEY
from bcsfl_flower.strategy import BCSFL
from bcsfl_vision.baselines import build_baseline

LAYERS = {"fc1.weight": (1024, 784), "fc1.bias": (1024,), "fc2.weight": (170, 1024)}
"""A 1M-parameter MLP: 784 -> 1024 -> 170 (1,004,544 parameters)."""

ASSUMED_ATTACKERS = 0.3
"""Attacker fraction MultiKrum is configured for (as in the grid's attacked cells)."""


def _metadata(src: int, dst: int, message_id: str, reply_to: str, kind: str) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )


class InstantGrid:
    """A grid whose nodes exist and whose validators answer at once with a fixed loss.

    The current model scores 1.0 and every candidate 0.9, so every candidate is accepted
    and the decision never waits on evaluation.
    """

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        """Return the federation's node ids."""
        return self.node_ids

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        """Reply to every evaluate message with the loss of the model it names."""
        replies = []
        for message in messages:
            self.sent += 1
            message_id = f"bench-{self.sent}"
            message.metadata.__dict__["_message_id"] = message_id
            config = next(iter(message.content.config_records.values()))
            loss = 1.0 if config[CANDIDATE_CONFIG_KEY] == BASELINE_CANDIDATE else 0.9
            content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": 10})})
            meta = _metadata(
                message.metadata.dst_node_id, 0, f"r{message_id}", message_id, "evaluate"
            )
            replies.append(make_message(metadata=meta, content=content))
        return replies


def federation(num_clients: int, seed: int = 0) -> tuple[ArrayRecord, list[Message]]:
    """Return a global model and one train reply per client (honest, heterogeneous updates)."""
    rng = np.random.default_rng(seed)
    global_np = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in LAYERS.items()}
    direction = {k: rng.standard_normal(s).astype(np.float32) for k, s in LAYERS.items()}
    replies = []
    for node in range(1, num_clients + 1):
        scale = np.float32(1e-3 * rng.uniform(0.5, 1.5))
        arrays = ArrayRecord(
            {
                k: Array(global_np[k] + scale * (direction[k] + rng.standard_normal(s, np.float32)))
                for k, s in LAYERS.items()
            }
        )
        metrics = MetricRecord({"num-examples": int(rng.integers(100, 1000)), "train_loss": 0.5})
        meta = _metadata(node, 0, f"train-{node}", "ins", "train")
        replies.append(
            make_message(metadata=meta, content=RecordDict({"arrays": arrays, "metrics": metrics}))
        )
    return ArrayRecord({k: Array(v) for k, v in global_np.items()}), replies


def decide(strategy: Strategy, global_arrays: ArrayRecord, replies: list[Message]) -> float:
    """Return the seconds ``configure_train`` + ``aggregate_train`` take for one round."""
    grid = InstantGrid([m.metadata.src_node_id for m in replies])
    started = time.perf_counter()
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    arrays, _ = strategy.aggregate_train(1, replies)
    elapsed = time.perf_counter() - started
    if arrays is None:
        raise RuntimeError(f"{type(strategy).__name__} produced no model")
    return elapsed


STRATEGIES: dict[str, Callable[[int], Strategy]] = {
    "FedAvg": lambda n: build_baseline("fedavg", num_nodes=n, attacker_fraction=0.0),
    "MultiKrum": lambda n: build_baseline(
        "multikrum", num_nodes=n, attacker_fraction=ASSUMED_ATTACKERS
    ),
    "BCSFL": lambda n: BCSFL(fraction_evaluate=0.0),
}


def measure(num_clients: int, repeats: int) -> dict[str, float]:
    """Return each strategy's median decision time for one federation size."""
    global_arrays, replies = federation(num_clients)
    times: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    for _ in range(repeats + 1):  # the first repetition warms caches and is dropped
        for name, build in STRATEGIES.items():
            times[name].append(decide(build(num_clients), global_arrays, replies))
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    FLOWER_LOGGER.setLevel(
        logging.ERROR
    )  # Flower logs every round (and warns of fraction_evaluate=0)
    parameters = sum(int(np.prod(shape)) for shape in LAYERS.values())
    print(f"model: {parameters:,} float32 parameters; median of {args.repeats} repetitions\n")
    print("| clients | FedAvg (s) | MultiKrum (s) | BCSFL (s) | BCSFL/FedAvg | BCSFL/MultiKrum |")
    print("|---:|---:|---:|---:|---:|---:|")
    worst_fedavg = worst_multikrum = 0.0
    for num_clients in args.clients:
        median = measure(num_clients, args.repeats)
        versus_fedavg = median["BCSFL"] / median["FedAvg"]
        versus_multikrum = median["BCSFL"] / median["MultiKrum"]
        worst_fedavg = max(worst_fedavg, versus_fedavg)
        worst_multikrum = max(worst_multikrum, versus_multikrum)
        print(
            f"| {num_clients} | {median['FedAvg']:.3f} | {median['MultiKrum']:.3f} | "
            f"{median['BCSFL']:.3f} | {versus_fedavg:.2f}x | {versus_multikrum:.2f}x |"
        )
    print(f"\nBCSFL/FedAvg {worst_fedavg:.2f}x  BCSFL/MultiKrum {worst_multikrum:.2f}x")


if __name__ == "__main__":
    main()
