"""Committee duty: validation and mining in one message per committee member.

Part of :mod:`bcsfl_flower.protocol` (see its docstring for the exchanges).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)

from bcsfl_flower.ballots import BALLOT_RECORD_KEY, SignedBallot
from bcsfl_flower.protocol.config import (
    CANDIDATE_CONFIG_KEY,
    ConfigValue,
)
from bcsfl_flower.protocol.mining import (
    APPROVAL_RECORD_KEY,
    CANDIDATE_RECORD_KEY,
    COMMITTEE_RECORD_KEY,
    PACKETS_RECORD_KEY,
    ROLLBACK_RECORD_KEY,
    STATEMENT_RECORD_KEY,
    VERDICT_RECORD_KEY,
    MinerVerdict,
    _verdict_from,
)
from bcsfl_flower.protocol.validation import (
    _loss_from,
)

DUTY_RECORD_KEY = "bcsfl.duty"
"""Committee duty request: ``models`` (names to evaluate, in order), ``mine`` (candidate
names to approve), and the ``arrayrecord-key`` / ``configrecord-key`` under which the
member's own evaluate handler expects the model and its config."""

DUTY_MODEL_PREFIX = "bcsfl.model."
"""Committee duty request: the ArrayRecord of model ``name`` is ``DUTY_MODEL_PREFIX + name``."""

DUTY_METRICS_PREFIX = "bcsfl.metrics."
"""Committee duty reply: the metrics the member's evaluate handler reported for ``name``."""

DUTY_CAPABLE_RECORD_KEY = "bcsfl.mod"
"""Train reply: the bcsfl mod's mark (``{"committee-duty": True}``) that its node serves
committee duties, so the strategy can send it one duty message even when the run has
no audit trail (and so no signed packet to tell it by)."""

DUTY_ERRORS_RECORD_KEY = "bcsfl.duty-errors"
"""Committee duty reply: model or candidate name -> why the member could not serve it."""


@dataclass(frozen=True)
class CommitteeDuty:
    """What one committee member is asked in the round's single committee exchange.

    A member running the bcsfl mod gets one ``evaluate`` message instead of one per
    model, and, if it is also a miner, signs every candidate's approval in the same
    exchange; the strategy keeps the approval of the candidate that commits.

    Attributes
    ----------
    models : Mapping[str, ArrayRecord]
        Models to evaluate (empty for a member that only mines), ``w_t`` included.
    config : Mapping[str, ConfigValue]
        The evaluate config each model goes out with (the round, CKKS flag).
    mining : Mapping[str, RecordDict]
        Candidate name -> its :func:`mine_request` (empty for a member that only validates).
    arrayrecord_key, configrecord_key : str
        Record names of the member's evaluate messages (the strategy's FedAvg arguments).
    loss_key : str | None
        The metric that is the loss. When set, and ``config`` carries the signing domain
        (:func:`signing_config`), a validator signs a ballot of its losses
        (:class:`~bcsfl_flower.ballots.Ballot`).
    """

    models: Mapping[str, ArrayRecord]
    config: Mapping[str, ConfigValue]
    mining: Mapping[str, RecordDict]
    arrayrecord_key: str = "arrays"
    configrecord_key: str = "config"
    loss_key: str | None = None


def serves_duty(content: RecordDict) -> bool:
    """Return whether a train reply carries the bcsfl mod's committee-duty mark."""
    record = content.config_records.get(DUTY_CAPABLE_RECORD_KEY)
    return record is not None and record.get("committee-duty") is True


def duty_content(duty: CommitteeDuty) -> RecordDict:
    """Return the content of a committee duty message (sent as ``evaluate``).

    Each model travels once: a candidate's mine request refers to the model of the same
    name instead of carrying its own copy.
    """
    content = RecordDict(
        {
            DUTY_RECORD_KEY: ConfigRecord(
                {
                    "models": list(duty.models),
                    "mine": list(duty.mining),
                    "arrayrecord-key": duty.arrayrecord_key,
                    "configrecord-key": duty.configrecord_key,
                    **({} if duty.loss_key is None else {"loss-key": duty.loss_key}),
                }
            ),
            duty.configrecord_key: ConfigRecord(dict(duty.config)),
        }
    )
    for name, arrays in duty.models.items():
        content[DUTY_MODEL_PREFIX + name] = arrays
    for name, request in duty.mining.items():
        for key, record in request.config_records.items():
            content[f"{key}.{name}"] = record
        if name not in duty.models and CANDIDATE_RECORD_KEY in request.array_records:
            content[DUTY_MODEL_PREFIX + name] = request.array_records[CANDIDATE_RECORD_KEY]
    return content


def read_duty(content: RecordDict) -> CommitteeDuty | None:
    """Parse a committee duty request; None if ``content`` is an ordinary evaluate message.

    Raises
    ------
    ValueError
        If the duty record is there but malformed.
    """
    record = content.config_records.get(DUTY_RECORD_KEY)
    if record is None:
        return None
    names: dict[str, Any] = {field: record.get(field) for field in ("models", "mine")}
    keys = {field: record.get(field) for field in ("arrayrecord-key", "configrecord-key")}
    for field, value in names.items():
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ValueError(f"duty field {field!r} must be a list of names, got {value!r}")
    for field, value in keys.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"duty field {field!r} must be a record name, got {value!r}")
    config = content.config_records.get(str(keys["configrecord-key"]), ConfigRecord())
    loss_key = record.get("loss-key")
    if loss_key is not None and not isinstance(loss_key, str):
        raise ValueError(f"duty field 'loss-key' must be a metric name, got {loss_key!r}")
    return CommitteeDuty(
        models={name: _duty_model(content, name) for name in names["models"]},
        config=cast(Mapping[str, ConfigValue], dict(config.items())),
        mining={name: _duty_mine_request(content, name) for name in names["mine"]},
        arrayrecord_key=str(keys["arrayrecord-key"]),
        configrecord_key=str(keys["configrecord-key"]),
        loss_key=loss_key,
    )


def _duty_model(content: RecordDict, name: str) -> ArrayRecord:
    arrays = content.array_records.get(DUTY_MODEL_PREFIX + name)
    if arrays is None:
        raise ValueError(f"the duty names model {name!r} but does not carry it")
    return arrays


def _duty_mine_request(content: RecordDict, name: str) -> RecordDict:
    """Return a duty's mine request ``name``: a candidate's (with its model) or the rollback."""
    request = RecordDict()
    if f"{ROLLBACK_RECORD_KEY}.{name}" not in content.config_records:
        request[CANDIDATE_RECORD_KEY] = _duty_model(content, name)
    keys = (APPROVAL_RECORD_KEY, ROLLBACK_RECORD_KEY, COMMITTEE_RECORD_KEY, PACKETS_RECORD_KEY)
    for key in (*keys, STATEMENT_RECORD_KEY):
        record = content.config_records.get(f"{key}.{name}")
        if record is not None:
            request[key] = record
    return request


def evaluation_content(duty: CommitteeDuty, name: str) -> RecordDict:
    """Return the ordinary evaluate content for model ``name`` of ``duty``.

    This is exactly what :func:`validation_requests` sends a validator that does not
    run the bcsfl mod, so the member's evaluate handler cannot tell the two apart.
    """
    config = ConfigRecord({**duty.config, CANDIDATE_CONFIG_KEY: name})
    return RecordDict({duty.arrayrecord_key: duty.models[name], duty.configrecord_key: config})


def duty_reply_content(
    metrics: Mapping[str, RecordDict],
    verdicts: Mapping[str, RecordDict],
    errors: Mapping[str, str],
    ballot: SignedBallot | None = None,
) -> RecordDict:
    """Return a member's answer: each model's metrics, each candidate's verdict, and errors.

    Parameters
    ----------
    metrics : Mapping[str, RecordDict]
        Model name -> the content its evaluate handler replied with (metric records
        are kept, merged in order).
    verdicts : Mapping[str, RecordDict]
        Candidate name -> :func:`verdict_content`.
    errors : Mapping[str, str]
        Model or candidate name -> why it could not be served.
    ballot : SignedBallot, optional
        The validator's signed ballot of the losses it reports.
    """
    content = RecordDict()
    if ballot is not None:
        content[BALLOT_RECORD_KEY] = ballot.to_config_record()
    for name, reply in metrics.items():
        merged: dict[str, Any] = {}
        for record in reply.metric_records.values():
            merged.update(record)
        content[DUTY_METRICS_PREFIX + name] = MetricRecord(merged)
    for name, verdict in verdicts.items():
        content[f"{VERDICT_RECORD_KEY}.{name}"] = verdict[VERDICT_RECORD_KEY]
    if errors:
        content[DUTY_ERRORS_RECORD_KEY] = ConfigRecord(dict(errors))
    return content


def read_duty_loss(reply: Message, name: str, loss_key: str) -> tuple[float, str | None]:
    """Return the loss a duty reply reports for model ``name``, or NaN and why not."""
    if reply.has_error():
        return math.nan, f"error reply: {reply.error.reason}"
    errors = reply.content.config_records.get(DUTY_ERRORS_RECORD_KEY, ConfigRecord())
    if name in errors:
        return math.nan, f"evaluation failed: {errors[name]!s}"
    record = reply.content.metric_records.get(DUTY_METRICS_PREFIX + name)
    if record is None:
        return math.nan, f"no metrics for {name!r}"
    return _loss_from([record], loss_key)


def read_duty_ballot(reply: Message) -> tuple[SignedBallot | None, str | None]:
    """Return a duty reply's signed ballot (None if it has none) and what is wrong with it.

    Never raises: a malformed ballot is ``(None, why)``.
    """
    if reply.has_error():
        return None, None
    record = reply.content.config_records.get(BALLOT_RECORD_KEY)
    if record is None:
        return None, None
    try:
        return SignedBallot.from_config_record(record), None
    except ValueError as err:
        return None, f"malformed ballot: {err}"


def duty_losses(duty: CommitteeDuty, metrics: Mapping[str, RecordDict]) -> dict[str, float]:
    """Return model name -> the loss its evaluate reply reported (NaN if none).

    The validator's side of :func:`read_duty_loss`: what it signs in its ballot.
    """
    loss_key = duty.loss_key or "loss"
    losses = {}
    for name in duty.models:
        reply = metrics.get(name)
        records = [] if reply is None else list(reply.metric_records.values())
        losses[name] = _loss_from(records, loss_key)[0]
    return losses


def read_duty_verdict(reply: Message, name: str) -> MinerVerdict:
    """Return a member's verdict on candidate ``name``; never raises."""
    if reply.has_error():
        return MinerVerdict(None, None, f"error reply: {reply.error.reason}")
    record = reply.content.config_records.get(f"{VERDICT_RECORD_KEY}.{name}")
    if record is None:
        errors = reply.content.config_records.get(DUTY_ERRORS_RECORD_KEY, ConfigRecord())
        return MinerVerdict(None, None, str(errors.get(name, f"no verdict on {name!r}")))
    return _verdict_from(record)
