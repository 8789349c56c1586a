"""Check each training reply on its own before it can reach aggregation.

Flower's ``FedAvg`` validates replies as a batch and raises
``InconsistentMessageReplies`` (an ``AppExitException``) when any one of them is off,
so a single broken or malicious client stops the whole ServerApp. Here every reply
is judged alone against the global model that was sent out; a bad one is rejected
with a reason that is logged and recorded, and the round goes on with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

T = TypeVar("T")


@dataclass(frozen=True)
class AcceptedReply:
    """A reply that passed every check, with the pieces aggregation needs."""

    node_id: int
    arrays: ArrayRecord
    metrics: MetricRecord
    num_examples: float
    message: Message


@dataclass(frozen=True)
class RejectedReply:
    """A reply that failed a check, and why."""

    node_id: int
    reason: str


class ReplyChecker:
    """Validate train replies one by one against the global model's structure.

    Parameters
    ----------
    reference : ArrayRecord
        The global model sent in this round: replies must carry exactly its keys,
        with the same shapes and dtypes.
    weighted_by_key : str
        The MetricRecord key holding the number of training examples; it must be a
        finite number > 0 because it weighs the reply in the aggregate.
    """

    def __init__(self, reference: ArrayRecord, weighted_by_key: str = "num-examples") -> None:
        self.weighted_by_key = weighted_by_key
        self._spec = {key: (arr.dtype, tuple(arr.shape)) for key, arr in reference.items()}

    def check(self, message: Message) -> AcceptedReply | RejectedReply:
        """Return an :class:`AcceptedReply`, or a :class:`RejectedReply` naming the first fault."""
        node_id = message.metadata.src_node_id
        if message.has_error():
            return RejectedReply(node_id, f"error reply: {message.error.reason}")
        content = message.content
        if len(content.array_records) != 1:
            return RejectedReply(
                node_id, f"expected exactly one ArrayRecord, got {len(content.array_records)}"
            )
        if len(content.metric_records) != 1:
            return RejectedReply(
                node_id, f"expected exactly one MetricRecord, got {len(content.metric_records)}"
            )
        arrays = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))

        fault = self._array_fault(arrays)
        if fault is not None:
            return RejectedReply(node_id, fault)

        weight = example_weight(metrics, self.weighted_by_key)
        if isinstance(weight, str):
            return RejectedReply(node_id, weight)
        return AcceptedReply(node_id, arrays, metrics, weight, message)

    def _array_fault(self, arrays: ArrayRecord) -> str | None:
        keys = set(arrays.keys())
        expected = set(self._spec)
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if extra:
                parts.append(f"unexpected keys {extra}")
            return "arrays do not match the global model: " + ", ".join(parts)
        for key, (dtype, shape) in self._spec.items():
            array = arrays[key]
            if array.dtype != dtype or tuple(array.shape) != shape:
                return (
                    f"array '{key}' is {array.dtype}{list(array.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )
            try:
                values = array.numpy()
            except (ValueError, TypeError) as err:
                return f"array '{key}' cannot be decoded: {err}"
            if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
                return f"array '{key}' contains NaN or infinite values"
        return None

    def split(self, replies: Iterable[Message]) -> tuple[list[AcceptedReply], list[RejectedReply]]:
        """Check every reply and log each rejection; return ``(accepted, rejected)``."""
        return split_replies(self.check, replies)


def example_weight(metrics: MetricRecord, weighted_by_key: str) -> float | str:
    """Return a reply's aggregation weight, or the reason it cannot weigh anything.

    The weight must be a finite number > 0: it scales the reply in the aggregate, so a
    zero, negative, NaN or list value would silently distort or break the mean.
    """
    weight = metrics.get(weighted_by_key)
    if weight is None:
        return f"metric '{weighted_by_key}' is missing"
    if isinstance(weight, list | bool) or not math.isfinite(weight) or weight <= 0:
        return f"metric '{weighted_by_key}' must be a finite number > 0, got {weight!r}"
    return float(weight)


def split_replies(
    check: Callable[[Message], T | RejectedReply], replies: Iterable[Message]
) -> tuple[list[T], list[RejectedReply]]:
    """Apply ``check`` to every reply, log each rejection; return ``(accepted, rejected)``."""
    accepted: list[T] = []
    rejected: list[RejectedReply] = []
    for message in replies:
        outcome = check(message)
        if isinstance(outcome, RejectedReply):
            log(WARNING, "Rejected reply from node %s: %s", outcome.node_id, outcome.reason)
            rejected.append(outcome)
        else:
            accepted.append(outcome)
    return accepted, rejected
