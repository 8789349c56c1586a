"""Run one cell of the bench: a 20-round federation through the public Strategy API.

Every round, each honest client trains on its own shard from the global model, the
attackers train as their attack says and then replace their updates by the attack's
vectors, and the strategy under test gets the replies through ``configure_train`` and
``aggregate_train``, as in a ``flwr run``. BCSFL's committee is answered in process
(:class:`ValidatorGrid`): an honest validator reports its real loss on its held-out
data; a Byzantine one colludes, reporting ``2 L(w_t) - L(model)``, so it accepts what
hurts and rejects what helps.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message

from bcsfl_flower.committee import draw_committee
from bcsfl_flower.packets import model_hash
from bcsfl_flower.round.settings import RoundSettings
from bcsfl_vision.task.attacks import choose_attackers, flip_labels
from sim.robust.attacks import BallotView, RoundView
from sim.robust.contenders import CONTENDERS
from sim.robust.messages import reply_metadata
from sim.robust.tasks import (
    BACKDOOR_TARGET,
    LEARNERS,
    TRIGGER_PARTS,
    Federation,
    Weights,
    build_federation,
    flatten,
    stamp_trigger,
    unflatten,
)
from sim.robust.threats import ATTACKS

DEFAULT_VALIDATORS = RoundSettings().num_validators
"""Validator seats a sleeper assumes when the strategy under test draws no committee."""


@dataclass(frozen=True)
class Cell:
    """One federation of the bench."""

    model: str
    alpha: float | None
    attack: str
    share: float
    strategy: str
    seed: int
    rounds: int = 20
    clients: int = 20
    max_train: int | None = None
    learning_rate: float = 0.05
    epochs: int = 1
    batch_size: int = 32

    @property
    def run_id(self) -> str:
        """A file-name-safe id naming every field that changes the result.

        Local training is named only where it is not the tuning presets' (learning rate
        0.05, one epoch, batch 32), so their stored runs keep their ids.
        """
        skew = "iid" if self.alpha is None else f"a{self.alpha:g}"
        cap = "" if self.max_train is None else f"-cap{self.max_train}"
        local = (self.learning_rate, self.epochs, self.batch_size)
        sgd = "" if local == (0.05, 1, 32) else f"-lr{local[0]:g}-e{local[1]}-b{local[2]}"
        return (
            f"{self.model}-{skew}-{self.attack}-{round(100 * self.share)}-{self.strategy}"
            f"-n{self.clients}-r{self.rounds}{cap}{sgd}-s{self.seed}"
        )


def train_reply(node: int, weights: Weights, num_examples: int) -> Message:
    """Return a client's train reply as Flower delivers it."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return make_message(metadata=reply_metadata(node, "train"), content=content)


class ValidatorGrid:
    """A grid that answers evaluate messages in process with each node's loss.

    A node whose loss function returns None withholds its answer.
    """

    def __init__(self, num_nodes: int, loss: Callable[[int, Weights], float | None]) -> None:
        self.num_nodes = num_nodes
        self.loss = loss

    def get_node_ids(self) -> list[int]:
        """Return the node ids (node ``k + 1`` holds shard ``k``)."""
        return list(range(1, self.num_nodes + 1))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Answer every evaluate message with the node's loss on its validation data."""
        replies = []
        for number, message in enumerate(messages):
            # Outside a run Flower leaves message ids empty; the strategy matches replies by id.
            message.metadata.__dict__["_message_id"] = f"ins-{time.monotonic_ns()}-{number}"
            node = message.metadata.dst_node_id
            record = message.content.array_records[next(iter(message.content.array_records))]
            weights = {k: record[k].numpy() for k in record}
            loss = self.loss(node, weights)
            if loss is None:
                continue
            metrics = MetricRecord({"eval_loss": loss, "num-examples": 10})
            meta = reply_metadata(node, message.metadata.message_type)
            meta.__dict__["_reply_to_message_id"] = message.metadata.message_id
            replies.append(make_message(metadata=meta, content=RecordDict({"metrics": metrics})))
        return replies


@dataclass(frozen=True)
class RoundResult:
    """One round's outcome."""

    server_round: int
    accuracy: float
    backdoor_success: float | None
    committed: bool | None = None
    honest_rejected: int = 0
    byzantine_rejected: int = 0
    validators: tuple[int, ...] = ()
    stakes: tuple[float, ...] = ()


class CellRun:
    """State of one running cell (the global model, the attackers, the strategy)."""

    def __init__(self, cell: Cell, data_dir: Path, federation: Federation | None = None) -> None:
        self.cell = cell
        self.federation = federation or build_federation(
            data_dir, cell.clients, cell.alpha, cell.seed, cell.max_train
        )
        self.learner = LEARNERS[cell.model](cell.learning_rate, cell.batch_size, cell.epochs)
        self.attack = ATTACKS[cell.attack]()
        self.attackers = sorted(choose_attackers(cell.clients, cell.share, cell.seed))
        contender = CONTENDERS[cell.strategy]
        self.strategy = contender.build(cell.clients, len(self.attackers))
        self.target = contender.target(cell.clients, len(self.attackers))
        self.records: list[dict[str, Any]] = []
        if hasattr(self.strategy, "round_sink"):
            self.strategy.round_sink = lambda _round, record: self.records.append(record)
        self.weights = self.learner.initial(cell.seed)
        self._baseline_loss: dict[int, float] = {}
        self._round = 0
        self.grid = ValidatorGrid(cell.clients, self._validator_loss)

    def _validator_loss(self, node: int, weights: Weights) -> float | None:
        shard = self.federation.shards[node - 1]
        loss = self.learner.loss(weights, shard.val_x, shard.val_y)
        if node - 1 not in self.attackers:
            return loss
        if node not in self._baseline_loss:
            self._baseline_loss[node] = self.learner.loss(self.weights, shard.val_x, shard.val_y)
        return self.attack.ballot(
            BallotView(
                self._round,
                loss,
                self._baseline_loss[node],
                is_global=all(np.array_equal(weights[k], self.weights[k]) for k in weights),
                objective=lambda: self.learner.loss(
                    weights,
                    shard.val_x,
                    torch.from_numpy(flip_labels(shard.val_y.numpy(), num_classes=10)),
                ),
            )
        )

    def _local_update(self, client: int, server_round: int, training: str) -> np.ndarray:
        shard = self.federation.shards[client]
        labels = shard.train_y
        if training == "flip":
            labels = torch.from_numpy(flip_labels(shard.train_y.numpy(), num_classes=10))
        seed = self.cell.seed * 1_000_003 + server_round * 1_009 + client
        part = (
            self.attackers.index(client) % TRIGGER_PARTS
            if training == "dba" and client in self.attackers
            else None
        )
        trained = self.learner.train(
            self.weights,
            shard.train_x,
            labels,
            seed,
            backdoor=training in ("backdoor", "dba"),
            part=part,
        )
        return flatten(trained)

    def _attacker_seats(self, server_round: int) -> int:
        """Predict the attackers' validator seats this round, as they can before training.

        The draw is BCSFL's (stake-weighted, seeded by ``w_t``'s hash and the round) over
        every client with the strategy's current stakes; for strategies without stakes,
        over equal stakes. Screening may shrink the real pool: this is the attackers'
        best guess, not an oracle.
        """
        ledger = getattr(self.strategy, "ledger", None)
        known = ledger.as_dict() if ledger is not None else {}
        names = [f"node:{node}" for node in range(1, self.cell.clients + 1)]
        stakes = {name: float(known.get(name, 1.0)) for name in names}
        settings = getattr(self.strategy, "settings", None)
        seats = DEFAULT_VALIDATORS if settings is None else settings.num_validators
        drawn = draw_committee(
            stakes, names, min(seats, len(names)), 0, model_hash(self.weights), server_round
        )
        attackers = {f"node:{client + 1}" for client in self.attackers}
        return sum(1 for v in drawn.validators if v in attackers)

    def _decide(
        self, server_round: int, honest: dict[int, np.ndarray]
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Return the strategy's whole round on a copy of its state, as ``f(attack updates)``."""
        reference = flatten(self.weights)
        arrays = ArrayRecord({k: Array(v) for k, v in self.weights.items()})

        def decide(attack: np.ndarray) -> np.ndarray:
            trial = copy.deepcopy(self.strategy)
            if hasattr(trial, "round_sink"):
                trial.round_sink = None
            list(trial.configure_train(server_round, arrays, ConfigRecord(), self.grid))
            updates = {**honest, **dict(zip(self.attackers, attack, strict=True))}
            new_arrays, _ = trial.aggregate_train(server_round, self._replies(reference, updates))
            if new_arrays is None:
                return np.zeros_like(reference)
            return flatten({k: new_arrays[k].numpy() for k in self.weights}) - reference

        return decide

    def _replies(self, reference: np.ndarray, updates: dict[int, np.ndarray]) -> list[Message]:
        return [
            train_reply(
                client + 1,
                unflatten(reference + update, self.weights),
                self.federation.shards[client].num_examples,
            )
            for client, update in sorted(updates.items())
        ]

    def play_round(self, server_round: int) -> RoundResult:
        """Train, attack, aggregate and evaluate one round."""
        self._baseline_loss = {}
        self._round = server_round
        if self.attackers:
            self.attack.begin_round(server_round, self._attacker_seats(server_round))
        reference = flatten(self.weights)
        updates = {}
        training = self.attack.training(server_round)
        for client in range(self.cell.clients):
            kind = training if client in self.attackers else "honest"
            updates[client] = self._local_update(client, server_round, kind) - reference
        if self.attackers:
            honest = {c: u for c, u in updates.items() if c not in self.attackers}
            view = RoundView(
                server_round,
                np.stack(list(honest.values())),
                np.stack([updates[c] for c in self.attackers]),
                self.target,
                np.random.default_rng([self.cell.seed, server_round]),
                decide=self._decide(server_round, honest),
            )
            with np.errstate(all="ignore"):
                vectors = self.attack.updates(view)
            for client, vector in zip(self.attackers, vectors, strict=True):
                updates[client] = vector
        arrays = ArrayRecord({k: Array(v) for k, v in self.weights.items()})
        list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        with np.errstate(all="ignore"):
            new_arrays, _ = self.strategy.aggregate_train(
                server_round, self._replies(reference, updates)
            )
        if new_arrays is not None:
            self.weights = {k: new_arrays[k].numpy() for k in self.weights}
        return self._result(server_round)

    def _result(self, server_round: int) -> RoundResult:
        federation = self.federation
        predictions = self.learner.predict(self.weights, federation.test_x)
        accuracy = float(np.mean(predictions == federation.test_y.numpy()))
        backdoor = None
        if self.attack.measures_backdoor:
            others = federation.test_y.numpy() != BACKDOOR_TARGET
            stamped = stamp_trigger(federation.test_x[torch.from_numpy(others)])
            backdoor = float(
                np.mean(self.learner.predict(self.weights, stamped) == BACKDOOR_TARGET)
            )
        if not self.records or len(self.records) < server_round:
            return RoundResult(server_round, accuracy, backdoor)
        record = self.records[-1]
        attackers = {str(c + 1) for c in self.attackers}
        rejected = set(record["rejected"])
        committee = record.get("committee", {})
        stakes = record["stakes"]
        return RoundResult(
            server_round,
            accuracy,
            backdoor,
            committed=record["outcome"] == "commit",
            honest_rejected=len(rejected - attackers),
            byzantine_rejected=len(rejected & attackers),
            validators=tuple(int(v) for v in committee.get("validators", ())),
            stakes=tuple(stakes.get(str(n), 1.0) for n in range(1, self.cell.clients + 1)),
        )


def run_cell(cell: Cell, data_dir: Path, federation: Federation | None = None) -> dict[str, Any]:
    """Run ``cell`` and return its JSON result (the cell and every round)."""
    started = time.perf_counter()
    run = CellRun(cell, data_dir, federation)
    rounds = [asdict(run.play_round(r)) for r in range(1, cell.rounds + 1)]
    return {
        "cell": asdict(cell),
        "attackers": run.attackers,
        "rounds": rounds,
        "wall_s": time.perf_counter() - started,
    }
