"""Every message format that crosses the wire between the BCSFL strategy and its clients.

Server side (the strategy, the notary, the CKKS update space) and client side (the
bcsfl and CKKS mods) both import this module, so a record key or a message type is
defined exactly once and the server never imports ``bcsfl_flower.client``.

Four exchanges use it:

* **train** (Flower's own ``train`` message): the strategy adds
  :func:`signing_config` (and the CKKS flag) to the train config; a client running the
  bcsfl mod answers with a signed packet under :data:`PACKET_RECORD_KEY`.
* **validation** (Flower's own ``evaluate`` message): :func:`validation_requests`
  sends every validator the current model and each candidate, named under
  :data:`CANDIDATE_CONFIG_KEY`; :func:`read_loss` reads the loss each reply reports.
* **committee duty** (Flower's ``evaluate`` message, answered by the bcsfl mod): a
  member running the mod gets one message that carries every model it validates and
  every candidate it mines (:func:`duty_content` / :func:`read_duty`), so validation
  and mining take one exchange. Each candidate's part is a :func:`mine_request`
  (:func:`read_mine_request`), answered with :func:`verdict_content`;
  :func:`read_duty_loss` and :func:`read_duty_verdict` read the member's answer.
* **CKKS** (``query.bcsfl_ckks_gram`` and ``query.bcsfl_ckks_public``): the server
  asks key holders to decrypt a packed Gram matrix and one client for the public
  context.

Readers never raise on what a client sent: a malformed reply becomes a reason.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from eth_utils import is_address, to_checksum_address
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
)
from bcsfl_flower.ballots import BALLOT_RECORD_KEY, SignedBallot
from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
    ModelPacket,
    SignedModelPacket,
)

ConfigValue = bool | int | float | str | bytes
"""A scalar value a ConfigRecord can carry."""

# ------------------------------------------------------------------------------------------
# Train and evaluate configs
# ------------------------------------------------------------------------------------------

ROUND_KEY = "server-round"
"""Config key with the current round (Flower's strategies set it)."""

CHAIN_ID_KEY = "bcsfl-chain-id"
"""Train-config key with the chain id of the EIP-712 domain clients sign under."""

CONTRACT_KEY = "bcsfl-contract"
"""Train-config key with the audit contract address of the EIP-712 domain."""

RUN_KEY = "bcsfl-run"
"""Train-config key with the run's identity (32 bytes), the first member of every signed
struct (:attr:`~bcsfl_flower.packets.Eip712Domain.run`)."""

DEVELOPMENT_KEYS_KEY = "bcsfl-development-keys"
"""Signing-config key set (``True``) only when the trail registers the PUBLIC development
accounts, i.e. in simulation: a node with no keystore signs with its partition's
development key only then, and refuses to sign otherwise."""

CKKS_CONFIG_KEY = "bcsfl-ckks"
"""Train- and evaluate-config key that switches the CKKS mod on: ``True``."""

CANDIDATE_CONFIG_KEY = "bcsfl-candidate"
"""Evaluate-config key naming the model a validator scores (it also makes every message
to the same validator distinct)."""

BASELINE_CANDIDATE = "w_t"
"""Name under which validators score the current global model."""

DP_EPSILON_KEY = "dp-epsilon"
"""Train metric in which a DP client reports the epsilon it has spent so far."""

BUDGET_REFUSAL = "privacy budget exceeded"
"""A DP client that would overspend ``dp-target-epsilon`` refuses to train with an error
reply whose reason contains this (:mod:`bcsfl_flower.privacy.budget`)."""


def all_refused_for_budget(reasons: Iterable[str]) -> bool:
    """Return whether there were reasons and every one is a privacy budget refusal."""
    reasons = list(reasons)
    return bool(reasons) and all(BUDGET_REFUSAL in reason for reason in reasons)


def config_value(content: RecordDict, key: str) -> ConfigValue | list[Any] | None:
    """Return ``key`` from the first ConfigRecord of ``content`` that holds it.

    Strategies may send their config under any record name (FedAvg's
    ``configrecord_key``), so clients look the key up in every ConfigRecord.
    """
    for record in content.config_records.values():
        if key in record:
            return record[key]
    return None


def signing_config(
    domain: Eip712Domain, *, development_keys: bool = False
) -> dict[str, ConfigValue]:
    """Return the config entries that make clients sign under ``domain``.

    ``development_keys`` tells nodes without a keystore that the trail registered the
    public development accounts (simulation), so they may sign with them.
    """
    config: dict[str, ConfigValue] = {
        CHAIN_ID_KEY: domain.chain_id,
        CONTRACT_KEY: domain.verifying_contract,
        RUN_KEY: domain.run,
    }
    if development_keys:
        config[DEVELOPMENT_KEYS_KEY] = True
    return config


def signing_domain(content: RecordDict) -> Eip712Domain | None:
    """Return the domain a train message asks its reply to be signed under, if any.

    Raises
    ------
    ValueError, TypeError
        If the entries are there but malformed (naming the field).
    """
    keys = (CHAIN_ID_KEY, CONTRACT_KEY, RUN_KEY)
    return config_domain({key: config_value(content, key) for key in keys})


def config_domain(config: Mapping[str, Any]) -> Eip712Domain | None:
    """Return the signing domain in a config mapping (:func:`signing_config`), if any.

    Raises
    ------
    ValueError, TypeError
        If the entries are there but malformed (naming the field).
    """
    values = [config.get(key) for key in (CHAIN_ID_KEY, CONTRACT_KEY, RUN_KEY)]
    if any(value is None for value in values):
        return None
    chain_id, contract, run = values
    # the config's values are a union; Eip712Domain checks the run id's type itself
    return Eip712Domain(int(chain_id), str(contract), run)  # type: ignore[arg-type]


def packet_record(content: RecordDict) -> ConfigRecord | None:
    """Return a train reply's packet record, or None for an unsigned reply."""
    return content.config_records.get(PACKET_RECORD_KEY)


def model_record(content: RecordDict, preferred: str = "arrays") -> tuple[str, ArrayRecord]:
    """Return the name and ArrayRecord of the model in ``content``.

    The record named ``preferred`` wins; otherwise the only ArrayRecord.

    Raises
    ------
    ValueError
        If there is no such record, or several and none is named ``preferred``.
    """
    records = content.array_records
    if preferred in records:
        return preferred, records[preferred]
    if len(records) == 1:
        return next(iter(records.items()))
    raise ValueError(
        f"the message has {len(records)} ArrayRecords and none named {preferred!r}; "
        "cannot tell which holds the model"
    )


# ------------------------------------------------------------------------------------------
# Validation: candidates as ordinary evaluate messages
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# Mining: the miners' approval of one candidate (part of a committee duty)
# ------------------------------------------------------------------------------------------

APPROVAL_RECORD_KEY = "bcsfl.approval"
"""Mine request: the approval to sign, plus ``chain-id``, ``contract`` and ``run``."""

ROLLBACK_RECORD_KEY = "bcsfl.rollback"
"""Rollback request: the rollback to sign, plus ``chain-id``, ``contract`` and ``run``."""

STATEMENT_RECORD_KEY = "bcsfl.statement"
"""Mine and rollback requests: ``{"statement": bytes}``, the round's state statement with
its ballots, from which the miner recomputes the decision before it signs."""

ROLLBACK_CANDIDATE = "rollback"
"""Name of the rollback among the mining duty's requests (no candidate is named so)."""

COMMITTEE_RECORD_KEY = "bcsfl.committee"
"""Mine request: ``{"miners": [address, ...]}``, the round's whole committee."""

PACKETS_RECORD_KEY = "bcsfl.packets"
"""Mine request (optional): the accepted packets, one list per field."""

CANDIDATE_RECORD_KEY = "arrays"
"""Mine request: the candidate global model."""

VERDICT_RECORD_KEY = "bcsfl.verdict"
"""Verdict on a mine request: ``approved``, ``signer``, and ``signature`` or ``reason``."""

_PACKET_FIELDS = ("model-hash", "timestamp", "round", "client", "signature")


def mine_request(
    approval: RoundApproval,
    domain: Eip712Domain,
    committee: Iterable[str],
    arrays: ArrayRecord,
    packets: Iterable[SignedModelPacket] = (),
    statement: bytes | None = None,
) -> RecordDict:
    """Return one candidate's mining request (a part of a :class:`CommitteeDuty`).

    Parameters
    ----------
    approval : RoundApproval
        The statement to approve (``AuditTrail.prepare_approval``).
    domain : Eip712Domain
        The trail's domain.
    committee : Iterable[str]
        The round's miners (addresses).
    arrays : ArrayRecord
        The candidate global model.
    packets : Iterable[SignedModelPacket], optional
        The accepted packets, so miners can check ``accepted_root``.
    statement : bytes, optional
        The round's state statement (:meth:`~bcsfl_flower.round.statement.RoundStatement.
        to_bytes`), so miners can recompute the decision.
    """
    content = RecordDict(
        {
            APPROVAL_RECORD_KEY: _with_domain(approval.to_config_record(), domain),
            COMMITTEE_RECORD_KEY: ConfigRecord({"miners": [str(m) for m in committee]}),
            CANDIDATE_RECORD_KEY: arrays,
        }
    )
    if statement is not None:
        content[STATEMENT_RECORD_KEY] = ConfigRecord({"statement": statement})
    packet_list = list(packets)
    if packet_list:
        content[PACKETS_RECORD_KEY] = ConfigRecord(
            {
                "model-hash": [p.packet.model_hash for p in packet_list],
                "timestamp": [p.packet.timestamp for p in packet_list],
                "round": [p.packet.round for p in packet_list],
                "client": [p.packet.client for p in packet_list],
                "signature": [p.signature for p in packet_list],
            }
        )
    return content


def rollback_request(
    rollback: RoundRollback,
    domain: Eip712Domain,
    committee: Iterable[str],
    statement: bytes | None = None,
) -> RecordDict:
    """Return the round's rollback request: what its miners sign so it can roll back."""
    content = RecordDict(
        {
            ROLLBACK_RECORD_KEY: _with_domain(rollback.to_config_record(), domain),
            COMMITTEE_RECORD_KEY: ConfigRecord({"miners": [str(m) for m in committee]}),
        }
    )
    if statement is not None:
        content[STATEMENT_RECORD_KEY] = ConfigRecord({"statement": statement})
    return content


def _with_domain(record: ConfigRecord, domain: Eip712Domain) -> ConfigRecord:
    record["chain-id"] = domain.chain_id
    record["contract"] = domain.verifying_contract
    record["run"] = domain.run
    return record


@dataclass(frozen=True)
class MineRequest:
    """A parsed miner duty request.

    Attributes
    ----------
    approval : RoundApproval | RoundRollback
        What the miner is asked to sign: a candidate's approval or the round's rollback.
    domain : Eip712Domain
        The domain to sign under.
    miners : tuple[str, ...]
        The round's miners, as sent.
    arrays : ArrayRecord | None
        The candidate model, if the request carries it.
    packets : tuple[SignedModelPacket, ...] | None
        The accepted packets, if the request carries them.
    statement : bytes | None
        The round's state statement, if the request carries it.
    """

    approval: RoundApproval | RoundRollback
    domain: Eip712Domain
    miners: tuple[str, ...] | None
    arrays: ArrayRecord | None
    packets: tuple[SignedModelPacket, ...] | None
    statement: bytes | None = None


def read_mine_request(content: RecordDict) -> MineRequest:
    """Parse a miner duty request.

    Raises
    ------
    ValueError, KeyError, TypeError
        If the approval record is missing or malformed, or the packet lists are.
    """
    records = content.config_records
    approval: RoundApproval | RoundRollback
    if APPROVAL_RECORD_KEY in records:
        record = records[APPROVAL_RECORD_KEY]
        approval = RoundApproval.from_config_record(record)
    elif ROLLBACK_RECORD_KEY in records:
        record = records[ROLLBACK_RECORD_KEY]
        approval = RoundRollback.from_config_record(record)
    else:
        raise ValueError(f"no {APPROVAL_RECORD_KEY!r} or {ROLLBACK_RECORD_KEY!r} record")
    # Eip712Domain checks the types itself (int() of a float inf would raise OverflowError),
    # so the config's union-typed values go to it unconverted
    domain = Eip712Domain(record["chain-id"], record["contract"], record["run"])  # type: ignore[arg-type]
    committee = content.config_records.get(COMMITTEE_RECORD_KEY)
    miners = None
    if committee is not None and "miners" in committee:
        listed = committee["miners"]
        if not isinstance(listed, list):  # a single str would be read as its characters
            raise TypeError(f"'miners' must be a list of addresses, got {listed!r}")
        miners = tuple(str(m) for m in listed)
    return MineRequest(
        approval=approval,
        domain=domain,
        miners=miners,
        arrays=content.array_records.get(CANDIDATE_RECORD_KEY),
        packets=_read_packets(content.config_records.get(PACKETS_RECORD_KEY)),
        statement=_read_statement(content.config_records.get(STATEMENT_RECORD_KEY)),
    )


def _read_statement(record: ConfigRecord | None) -> bytes | None:
    if record is None:
        return None
    statement = record.get("statement")
    if not isinstance(statement, bytes):
        raise TypeError(f"'statement' must be bytes, got {type(statement).__name__}")
    return statement


def _read_packets(record: ConfigRecord | None) -> tuple[SignedModelPacket, ...] | None:
    if record is None:
        return None
    # each column is a list-valued entry (a scalar one fails here: list() of it raises);
    # the packets' own constructor checks every element's type
    columns = [list(record[name]) for name in _PACKET_FIELDS]  # type: ignore[arg-type]
    if len({len(column) for column in columns}) != 1:
        raise ValueError("the packet lists have different lengths")
    return tuple(
        SignedModelPacket(ModelPacket(model, timestamp, round_number, client), signature)
        for model, timestamp, round_number, client, signature in zip(*columns, strict=True)
    )


def verdict_content(
    signer: str,
    *,
    signature: bytes | None = None,
    reason: str = "",
    refusal: bytes | None = None,
) -> RecordDict:
    """Return a miner's reply: an approval with ``signature``, or a refusal with ``reason``.

    A refusal of a commit may carry ``refusal``, the miner's signature over the round's
    rollback (:meth:`~bcsfl_flower.approvals.RoundApproval.refusal`), so that the
    rollback is the miners' word and not the operator's.
    """
    if signature is not None:
        verdict = ConfigRecord({"approved": True, "signer": signer, "signature": signature})
    else:
        verdict = ConfigRecord({"approved": False, "signer": signer, "reason": reason})
        if refusal is not None:
            verdict["refusal"] = refusal
    return RecordDict({VERDICT_RECORD_KEY: verdict})


@dataclass(frozen=True)
class MinerVerdict:
    """A miner's answer to the duty message.

    Attributes
    ----------
    signer : str | None
        The miner's address (None if the reply carried no verdict).
    signature : bytes | None
        Its approval signature, if it approved.
    reason : str | None
        Why it refused, or what was wrong with the reply.
    refusal : bytes | None
        Its signature over the round's rollback, if it refused a commit and signed so.
    """

    signer: str | None
    signature: bytes | None
    reason: str | None
    refusal: bytes | None = None

    @property
    def approved(self) -> bool:
        """Whether the miner approved (its signature still needs checking)."""
        return self.signature is not None


def _verdict_from(record: ConfigRecord) -> MinerVerdict:
    signer = record.get("signer")
    signer = to_checksum_address(signer) if isinstance(signer, str) and is_address(signer) else None
    signature = record.get("signature")
    if record.get("approved") is True and isinstance(signature, bytes) and signer is not None:
        return MinerVerdict(signer, signature, None)
    refusal = record.get("refusal")
    return MinerVerdict(
        signer,
        None,
        str(record.get("reason", "not approved")),
        refusal if isinstance(refusal, bytes) and signer is not None else None,
    )


# ------------------------------------------------------------------------------------------
# Committee duty: validation and mining in one message per committee member
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# CKKS: Gram decryption and the public context
# ------------------------------------------------------------------------------------------

GRAM_ACTION = "bcsfl_ckks_gram"
"""Action of the Gram decryption query (a Python identifier, as Flower requires)."""

GRAM_MESSAGE_TYPE = f"{MessageType.QUERY}.{GRAM_ACTION}"
"""Message type of the Gram decryption query: ``"query.bcsfl_ckks_gram"``."""

PUBLIC_ACTION = "bcsfl_ckks_public"
"""Action of the public context query."""

PUBLIC_MESSAGE_TYPE = f"{MessageType.QUERY}.{PUBLIC_ACTION}"
"""Message type of the public context query: ``"query.bcsfl_ckks_public"``."""


def is_ckks_work(msg: Message) -> bool:
    """Whether ``msg`` is one of the CKKS queries or a train/evaluate flagged CKKS."""
    message_type = msg.metadata.message_type
    if message_type in (GRAM_MESSAGE_TYPE, PUBLIC_MESSAGE_TYPE):
        return True
    return (
        message_type in (MessageType.TRAIN, MessageType.EVALUATE)
        and msg.has_content()
        and config_value(msg.content, CKKS_CONFIG_KEY) is True
    )


GRAM_REQUEST_RECORD_KEY = "bcsfl.ckks-gram-request"
"""Gram query: ConfigRecord with ``gram`` (EncryptedGram bytes) and ``server-round``."""

GRAM_RECORD_KEY = "bcsfl.ckks-gram"
"""Gram reply: ArrayRecord with the decrypted ``(n, n)`` float64 matrix under ``gram``."""

GRAM_DIGEST_RECORD_KEY = "bcsfl.ckks-gram-digest"
"""Gram reply: ConfigRecord with ``sha256``, the hex :func:`gram_digest` of the matrix."""

PUBLIC_RECORD_KEY = "bcsfl.ckks-public"
"""Public context reply: ArrayRecord with the serialised context as ``uint8`` under
``context``. An ArrayRecord rather than ConfigRecord bytes, because Flower transfers
arrays in chunks and the context is about 9.5 MB."""


def gram_request(data: bytes, server_round: int) -> RecordDict:
    """Return the content of a Gram query (send it as :data:`GRAM_MESSAGE_TYPE`).

    Parameters
    ----------
    data : bytes
        The serialised packed encrypted Gram matrix (``EncryptedGram.serialize()``).
    server_round : int
        The round it screens; a node decrypts one Gram per round.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"gram data must be bytes, got {type(data).__name__}")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise TypeError(f"server_round must be an int, got {server_round!r}")
    record = ConfigRecord({"gram": data, ROUND_KEY: server_round})
    return RecordDict({GRAM_REQUEST_RECORD_KEY: record})


def read_gram_request(content: RecordDict) -> tuple[bytes, int]:
    """Return the serialised Gram and the round of a Gram query.

    Raises
    ------
    ValueError
        If the record is missing or its fields have the wrong types.
    """
    record = content.config_records.get(GRAM_REQUEST_RECORD_KEY)
    if record is None:
        raise ValueError(f"no {GRAM_REQUEST_RECORD_KEY!r} record")
    data, server_round = record.get("gram"), record.get(ROUND_KEY)
    if not isinstance(data, bytes):
        raise ValueError("the request's 'gram' is not bytes")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"the request's {ROUND_KEY!r} must be an int, got {server_round!r}")
    return data, server_round


def gram_digest(matrix: np.ndarray) -> str:
    """Return the SHA-256 hex digest of a decrypted Gram matrix.

    Hashes the ASCII shape ``"<n>x<n>"`` then the values as little-endian float64 in C
    order. Decryption is deterministic, so honest committee members holding the same
    key return the same digest for the same ciphertext.
    """
    values = np.ascontiguousarray(matrix, dtype="<f8")
    shape = "x".join(str(size) for size in values.shape).encode()
    return hashlib.sha256(shape + values.tobytes()).hexdigest()


def gram_reply_content(matrix: np.ndarray) -> RecordDict:
    """Return a key holder's answer to a Gram query: the matrix and its digest."""
    return RecordDict(
        {
            GRAM_RECORD_KEY: ArrayRecord({"gram": Array(np.asarray(matrix, dtype=np.float64))}),
            GRAM_DIGEST_RECORD_KEY: ConfigRecord({"sha256": gram_digest(matrix)}),
        }
    )


def read_gram_reply(reply: Message, num_models: int) -> tuple[np.ndarray, str] | str:
    """Parse a committee member's Gram reply; never raises (a member may lie or fail).

    Returns
    -------
    tuple[np.ndarray, str] | str
        The ``(num_models, num_models)`` matrix and its digest (recomputed here, and
        required to equal the one the member reported), or the reason the reply is
        unusable.
    """
    if reply.has_error():
        return f"error reply: {reply.error.reason}"
    record = reply.content.array_records.get(GRAM_RECORD_KEY)
    digest_record = reply.content.config_records.get(GRAM_DIGEST_RECORD_KEY)
    if record is None or "gram" not in record or digest_record is None:
        return f"reply lacks {GRAM_RECORD_KEY!r} or {GRAM_DIGEST_RECORD_KEY!r}"
    try:
        matrix = record["gram"].numpy()
    except (ValueError, TypeError, EOFError) as err:  # np.load raises EOFError on no bytes
        return f"Gram matrix cannot be decoded: {err}"
    if matrix.dtype != np.float64 or matrix.shape != (num_models, num_models):
        return (
            f"Gram matrix is {matrix.dtype}{list(matrix.shape)}, expected "
            f"float64[{num_models}, {num_models}]"
        )
    if not np.all(np.isfinite(matrix)):
        return "Gram matrix contains NaN or infinite values"
    digest = gram_digest(matrix)
    if digest_record.get("sha256") != digest:
        return "reported sha256 does not match the returned matrix"
    return matrix, digest


def public_context_content(data: bytes) -> RecordDict:
    """Return a client's answer to the public context query."""
    record = ArrayRecord({"context": Array(np.frombuffer(data, dtype=np.uint8))})
    return RecordDict({PUBLIC_RECORD_KEY: record})


def read_public_context(reply: Message) -> bytes:
    """Return the serialised public context from a :data:`PUBLIC_MESSAGE_TYPE` reply.

    Raises
    ------
    ValueError
        If the reply is an error or lacks the context.
    """
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    record = reply.content.array_records.get(PUBLIC_RECORD_KEY)
    if record is None or "context" not in record:
        raise ValueError(f"reply has no {PUBLIC_RECORD_KEY!r} ArrayRecord with 'context'")
    try:
        payload = record["context"].numpy()
    except (ValueError, TypeError, EOFError) as err:  # np.load raises EOFError on no bytes
        raise ValueError(f"the public context cannot be decoded: {err}") from err
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError("the public context must be a 1-D uint8 array")
    return payload.tobytes()
