"""The check stage: judge every training reply on its own, before anything is compared.

Flower's ``FedAvg`` validates replies as a batch and raises
``InconsistentMessageReplies`` (an ``AppExitException``) when any one of them is off,
so a single broken or malicious client stops the whole ServerApp. Here every reply is
judged alone; a bad one is rejected with a reason that is logged and recorded, and the
round goes on with the rest. In order:

1. the reply is not an error, and carries exactly one ArrayRecord and one MetricRecord;
2. its example count is a finite number > 0, and every metric is finite;
3. its signed packet verifies (when the strategy runs an audit trail);
4. its arrays match the global model and their update is finite (the update space).

A node that answers twice keeps its first reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log

from bcsfl_flower.packets import SignedModelPacket
from bcsfl_flower.round.space import UpdateCollector
from bcsfl_flower.round.state import CheckedReplies, Contribution


@dataclass(frozen=True)
class PacketCheck:
    """Outcome of checking one reply's signed packet (no packet: both None)."""

    packet: SignedModelPacket | None = None
    rejection: str | None = None


PacketGate = Callable[[int, RecordDict, int], PacketCheck]
"""``(node_id, content, server_round) -> PacketCheck``, e.g. ``RoundNotary.check_packet``."""


def example_weight(metrics: MetricRecord, weighted_by_key: str) -> float | str:
    """Return a reply's example count, or the reason it cannot weigh anything.

    The count must be a finite number > 0: it scales the reply in the aggregate, so a
    zero, negative, NaN or list value would silently distort or break the mean. Huge
    counts are accepted here and capped by :mod:`bcsfl_flower.round.bounds`.
    """
    weight = metrics.get(weighted_by_key)
    if weight is None:
        return f"metric '{weighted_by_key}' is missing"
    if isinstance(weight, list | bool) or not math.isfinite(weight) or weight <= 0:
        return f"metric '{weighted_by_key}' must be a finite number > 0, got {weight!r}"
    return float(weight)


def metric_fault(metrics: MetricRecord) -> str | None:
    """Return why a reply's metrics cannot be aggregated, or None.

    Flower's metric aggregation multiplies every value by a weight, so one NaN or
    infinite value would poison the round's reported metrics.
    """
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric '{key}' is not finite: {value!r}"
    return None


def structure_fault(message: Message, weighted_by_key: str) -> tuple[float, str | None]:
    """Check what every reply needs whatever the update space; return (count, fault)."""
    if message.has_error():
        return 0.0, f"error reply: {message.error.reason}"
    content = message.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return 0.0, (
            f"expected exactly one ArrayRecord and one MetricRecord, got "
            f"{len(content.array_records)} and {len(content.metric_records)}"
        )
    metrics = next(iter(content.metric_records.values()))
    weight = example_weight(metrics, weighted_by_key)
    if isinstance(weight, str):
        return 0.0, weight
    return weight, metric_fault(metrics)


def check_replies(
    replies: Iterable[Message],
    collector: UpdateCollector[Any],
    weighted_by_key: str,
    server_round: int,
    packet_gate: PacketGate | None = None,
) -> CheckedReplies:
    """Run every check on every reply; return the accepted ones and the reasons for the rest."""
    accepted: list[Contribution] = []
    rejected: dict[str, str] = {}
    for message in replies:
        node = message.metadata.src_node_id
        if any(c.node_id == node for c in accepted) or str(node) in rejected:
            log(WARNING, "Ignored a second reply from node %s", node)
            continue
        weight, fault = structure_fault(message, weighted_by_key)
        packet = None
        if fault is None and packet_gate is not None:
            check = packet_gate(node, message.content, server_round)
            fault, packet = check.rejection, check.packet
        if fault is None:
            fault = collector.add(next(iter(message.content.array_records.values())))
        if fault is not None:
            log(WARNING, "Rejected reply from node %s: %s", node, fault)
            rejected[str(node)] = fault
            continue
        metrics = next(iter(message.content.metric_records.values()))
        accepted.append(Contribution(node, weight, metrics, message.content, packet))
    return CheckedReplies(tuple(accepted), rejected, collector.finish())
