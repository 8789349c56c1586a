"""Validation: candidates as ordinary evaluate messages, and the losses validators report.

Part of :mod:`bcsfl_flower.protocol` (see its docstring for the exchanges).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from bcsfl_flower.protocol.config import (
    CANDIDATE_CONFIG_KEY,
    ROUND_KEY,
    ConfigValue,
)


@dataclass(frozen=True)
class ValidationRequest:
    """One evaluate message of the validation exchange and what it asks."""

    message: Message
    validator: str
    candidate: str


def validation_requests(
    validators: Sequence[str],
    models: Mapping[str, ArrayRecord],
    server_round: int,
    *,
    arrayrecord_key: str = "arrays",
    configrecord_key: str = "config",
    extra_config: Mapping[str, ConfigValue] | None = None,
) -> list[ValidationRequest]:
    """Build one ``evaluate`` message per validator and model.

    Parameters
    ----------
    validators : Sequence[str]
        Node ids of the validators.
    models : Mapping[str, ArrayRecord]
        Model name (:data:`BASELINE_CANDIDATE` for ``w_t``) -> arrays to score.
    server_round : int
        The current round, under :data:`ROUND_KEY`.
    arrayrecord_key, configrecord_key : str
        Record names, as the strategy's ``FedAvg`` arguments set them.
    extra_config : Mapping[str, ConfigValue], optional
        Further config entries (CKKS mode's flag).
    """
    requests = []
    for validator in validators:
        for name, arrays in models.items():
            config = ConfigRecord(
                {**(extra_config or {}), ROUND_KEY: server_round, CANDIDATE_CONFIG_KEY: name}
            )
            message = Message(
                content=RecordDict({arrayrecord_key: arrays, configrecord_key: config}),
                dst_node_id=int(validator),
                message_type=MessageType.EVALUATE,
            )
            requests.append(ValidationRequest(message, str(validator), name))
    return requests


def read_loss(reply: Message, loss_key: str) -> tuple[float, str | None]:
    """Return the loss an evaluate reply reports, or NaN and the reason it is unusable."""
    if reply.has_error():
        return math.nan, f"error reply: {reply.error.reason}"
    return _loss_from(reply.content.metric_records.values(), loss_key)


def _loss_from(records: Iterable[MetricRecord], loss_key: str) -> tuple[float, str | None]:
    for record in records:
        value = record.get(loss_key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return math.nan, f"'{loss_key}' is not a number: {value!r}"
        if not math.isfinite(value):
            return math.nan, f"'{loss_key}' is not finite: {value!r}"
        return float(value), None
    return math.nan, f"metric '{loss_key}' missing"
