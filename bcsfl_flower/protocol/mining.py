"""Mining: the miners' approval (or rollback) of one candidate, and their verdicts.

Part of :mod:`bcsfl_flower.protocol` (see its docstring for the exchanges).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from eth_utils import is_address, to_checksum_address
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    RecordDict,
)

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
)
from bcsfl_flower.packets import (
    Eip712Domain,
    ModelPacket,
    SignedModelPacket,
)

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
