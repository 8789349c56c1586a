"""Build Flower reply Messages in unit tests, outside a running federation."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message import make_message

from bcsfl_flower.client.mod import bcsfl_mod
from bcsfl_flower.protocol import DUTY_RECORD_KEY
from sim.robust.messages import reply_metadata as metadata


def train_reply(
    node_id: int,
    arrays: dict[str, np.ndarray] | ArrayRecord,
    num_examples: object = 10,
    **metrics: float,
) -> Message:
    record = (
        arrays
        if isinstance(arrays, ArrayRecord)
        else ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
    )
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": num_examples, **metrics})}
    )
    return make_message(metadata=metadata(node_id), content=content)


def error_reply(node_id: int, reason: str) -> Message:
    return make_message(metadata=metadata(node_id), error=Error(code=1, reason=reason))


def reply_to(instruction: Message, content: RecordDict | None = None, error: Error | None = None):
    meta = metadata(instruction.metadata.dst_node_id, instruction.metadata.message_type)
    meta.__dict__["_reply_to_message_id"] = instruction.metadata.message_id
    return make_message(metadata=meta, content=content, error=error)


class FakeGrid:
    """Answers evaluate messages in-process with a caller-supplied loss function.

    ``loss_fn(node_id, arrays) -> float | None``: None makes that node send an error
    reply; nodes in ``silent`` do not answer at all (a timeout). A committee duty (sent
    to nodes that signed their train reply) goes through the real bcsfl mod, which
    evaluates each model with ``loss_fn`` and signs with the node's development key
    (``partition_of`` maps node ids to partitions; by default node ``n`` is ``n - 1``).
    """

    def __init__(self, loss_fn, silent=(), partition_of=None):
        self.loss_fn = loss_fn
        self.silent = set(silent)
        self.partition_of = partition_of
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"ins-{len(self.sent)}-{number}"
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if DUTY_RECORD_KEY in message.content.config_records:
                answer = bcsfl_mod(message, self.context(node), self.evaluate)
                replies.append(self.duty_reply(message, answer))
            else:
                replies.append(self.evaluate(message, None))
        return replies

    def evaluate(self, message, context):
        loss = self.loss_fn(message.metadata.dst_node_id, message.content["arrays"])
        if loss is None:
            return reply_to(message, error=Error(code=1, reason="crashed"))
        metrics = MetricRecord({"eval_loss": loss, "num-examples": 10})
        return reply_to(message, RecordDict({"metrics": metrics}))

    def context(self, node):
        partition = node - 1 if self.partition_of is None else self.partition_of[node]
        return Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": partition},
            state=RecordDict(),
            run_config={},
        )

    def duty_reply(self, message, answer):
        """Return the mod's answer as the reply the grid delivers (a subclass may alter it)."""
        if answer.has_error():
            return reply_to(message, error=answer.error)
        return reply_to(message, answer.content)

    def get_node_ids(self):
        return []


def update_replies(weights, updates) -> list[Message]:
    """Return node ``k + 1``'s train reply carrying ``weights + updates[k]`` (50 examples)."""
    return [
        train_reply(node + 1, {"w": (weights + update).astype(np.float32)}, 50)
        for node, update in enumerate(updates)
    ]


class NodeGrid:
    """A grid that only lists nodes 1-20 (what sampling in ``configure_train`` needs)."""

    def get_node_ids(self):
        return list(range(1, 21))
