"""What miners sign: a round's approval or its rollback, and the committee they sign as.

Both are EIP-712 typed data that mirror the ``BCSFLAudit`` contract's structs, so the
contract recovers the signers with ``ecrecover`` (:mod:`bcsfl_flower.chain.certificates`
assembles the quorum certificate). Their first member is the run's identity
(:data:`~bcsfl_flower.packets.RUN_MEMBER`), filled from the signing domain.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, keccak, to_checksum_address
from flwr.app import ConfigRecord

from bcsfl_flower.packets import (
    RUN_MEMBER,
    Eip712Domain,
    check_hash,
    check_uint64,
    recover_signer,
    typed_data_digest,
    typed_fields,
)

ROUND_APPROVAL_TYPES: dict[str, list[dict[str, str]]] = {
    "RoundApproval": [
        RUN_MEMBER,
        {"name": "round", "type": "uint64"},
        {"name": "modelHash", "type": "bytes32"},
        {"name": "previousHash", "type": "bytes32"},
        {"name": "acceptedRoot", "type": "bytes32"},
        {"name": "committeeRoot", "type": "bytes32"},
        {"name": "stateRoot", "type": "bytes32"},
        {"name": "timestamp", "type": "uint64"},
    ]
}
"""EIP-712 types of a miner's round approval; mirrors ``BCSFLAudit.RoundApproval``."""

ROUND_ROLLBACK_TYPES: dict[str, list[dict[str, str]]] = {
    "RoundRollback": [
        RUN_MEMBER,
        {"name": "round", "type": "uint64"},
        {"name": "keptModelHash", "type": "bytes32"},
        {"name": "committeeRoot", "type": "bytes32"},
        {"name": "stateRoot", "type": "bytes32"},
        {"name": "reasonHash", "type": "bytes32"},
    ]
}
"""EIP-712 types of a miner's rollback; mirrors ``BCSFLAudit.RoundRollback``."""


ROLLBACK_REASON_LIMIT = 200
"""Longest reason a rollback records (a longer one is cut: calldata costs gas)."""

REFUSAL_REASON = "rollback: a quorum of the round's miners refused to certify the commit"
"""The reason of a rollback certified by the miners' refusals of the ballots' commit."""


def rollback_reason(text: str) -> str:
    """Return ``text`` as a rollback records it (at most :data:`ROLLBACK_REASON_LIMIT`)."""
    return text[:ROLLBACK_REASON_LIMIT]


class MinerStatement(ABC):
    """What a miner signs: the contract recovers its signers from the EIP-712 digest."""

    round: int
    """The round the statement is for (a field of each subclass)."""

    @abstractmethod
    def signable(self, domain: Eip712Domain) -> SignableMessage:
        """Return the EIP-712 message under ``domain``."""

    def digest(self, domain: Eip712Domain) -> bytes:
        """Return the EIP-712 digest (the contract's ``approvalDigest`` or ``rollbackDigest``)."""
        return typed_data_digest(self.signable(domain))

    def sign(self, account: LocalAccount, domain: Eip712Domain) -> bytes:
        """Return ``account``'s 65-byte signature under ``domain``."""
        return bytes(account.sign_message(self.signable(domain)).signature)

    def recover(self, signature: bytes, domain: Eip712Domain) -> str:
        """Return the checksummed address that produced ``signature`` under ``domain``."""
        return recover_signer(self.signable(domain), signature)

    @property
    @abstractmethod
    def start_hash(self) -> bytes:
        """The model the round starts from: the chain head it must follow."""


@dataclass(frozen=True)
class RoundApproval(MinerStatement):
    """A miner's approval of one round; mirrors the contract's ``RoundApproval`` struct.

    Attributes
    ----------
    round : int
        The round being anchored (the genesis model is round 0).
    model_hash : bytes
        Hash of the round's committed global model.
    previous_hash : bytes
        Hash of the last anchored model (the hash-chain link).
    accepted_root : bytes
        :func:`accepted_root` of the packets accepted into the round.
    committee_root : bytes
        :func:`committee_root` of the round's miners.
    state_root : bytes
        Hash of the round's state statement (the stake table its committee was drawn
        from, the decision settings, the accepted replies and the draw), kept in the
        model store; zero when no statement is kept.
    timestamp : int
        Unix time in seconds when the candidate package was built.
    """

    round: int
    model_hash: bytes
    previous_hash: bytes
    accepted_root: bytes
    committee_root: bytes
    state_root: bytes
    timestamp: int

    @property
    def start_hash(self) -> bytes:
        """The model the round started from, which the approval links to."""
        return self.previous_hash

    def __post_init__(self) -> None:
        check_uint64("round", self.round)
        check_hash("model_hash", self.model_hash)
        check_hash("previous_hash", self.previous_hash)
        check_hash("accepted_root", self.accepted_root)
        check_hash("committee_root", self.committee_root)
        check_hash("state_root", self.state_root)
        check_uint64("timestamp", self.timestamp)

    def signable(self, domain: Eip712Domain) -> SignableMessage:
        """Return the EIP-712 message for this approval under ``domain``."""
        return domain.signable(
            ROUND_APPROVAL_TYPES,
            {
                "round": self.round,
                "modelHash": self.model_hash,
                "previousHash": self.previous_hash,
                "acceptedRoot": self.accepted_root,
                "committeeRoot": self.committee_root,
                "stateRoot": self.state_root,
                "timestamp": self.timestamp,
            },
        )

    def as_contract_tuple(self) -> tuple[int, bytes, bytes, bytes, bytes, bytes, int]:
        """Return the approval as the ABI tuple ``anchorRound`` takes."""
        return (
            self.round,
            self.model_hash,
            self.previous_hash,
            self.accepted_root,
            self.committee_root,
            self.state_root,
            self.timestamp,
        )

    def refusal(self) -> RoundRollback:
        """Return the rollback a miner signs when it refuses this approval.

        A refusing miner signs that the round keeps the model it started from, over the
        same committee and statement. A quorum of refusals certifies the rollback of a
        round whose ballots commit; without one, the operator's rollback of such a round
        is its word alone, and ``bcsfl audit verify`` reports the round as withheld.
        """
        return RoundRollback(
            self.round, self.previous_hash, self.committee_root, self.state_root, REFUSAL_REASON
        )

    def to_config_record(self) -> ConfigRecord:
        """Return the approval as a ConfigRecord, for a miner duty message."""
        return ConfigRecord(
            {
                "round": self.round,
                "model-hash": self.model_hash,
                "previous-hash": self.previous_hash,
                "accepted-root": self.accepted_root,
                "committee-root": self.committee_root,
                "state-root": self.state_root,
                "timestamp": self.timestamp,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundApproval:
        """Parse an approval written by :meth:`to_config_record`.

        Raises
        ------
        ValueError
            If a field is missing or has the wrong type, naming the field.
        """
        return cls(
            **typed_fields(
                record,
                "approval",
                (
                    ("round", int),
                    ("model-hash", bytes),
                    ("previous-hash", bytes),
                    ("accepted-root", bytes),
                    ("committee-root", bytes),
                    ("state-root", bytes),
                    ("timestamp", int),
                ),
            )
        )


@dataclass(frozen=True)
class RoundRollback(MinerStatement):
    """A miner's record that a round rolled back; mirrors the contract's ``RoundRollback``.

    A rollback anchors no model, but it closes its round on chain, so it is certified
    like a commit: ``recordRollback`` takes ``ceil(2N/3)`` signatures of registered
    miners (or the operator's alone, for a round that drew no committee).

    Attributes
    ----------
    round : int
        The round that rolled back.
    kept_model_hash : bytes
        The model the federation keeps: the last anchored one.
    committee_root : bytes
        :func:`committee_root` of the signing committee.
    state_root : bytes
        Hash of the round's state statement.
    reason : str
        Why the round rolled back, as recorded on chain: it is signed (its keccak256 is
        the struct's ``reasonHash``), and recomputed from the statement by the miners
        and by ``bcsfl audit verify``
        (:func:`~bcsfl_flower.round.conclusion.stated_rollback_reason`).
    """

    round: int
    kept_model_hash: bytes
    committee_root: bytes
    state_root: bytes
    reason: str

    @property
    def start_hash(self) -> bytes:
        """The model the round started from, which a rollback keeps."""
        return self.kept_model_hash

    def __post_init__(self) -> None:
        check_uint64("round", self.round)
        check_hash("kept_model_hash", self.kept_model_hash)
        check_hash("committee_root", self.committee_root)
        check_hash("state_root", self.state_root)
        if not isinstance(self.reason, str) or len(self.reason) > ROLLBACK_REASON_LIMIT:
            raise ValueError(
                f"reason must be a str of at most {ROLLBACK_REASON_LIMIT} characters, "
                f"got {self.reason!r:.80}"
            )

    @property
    def reason_hash(self) -> bytes:
        """keccak256 of the reason's UTF-8 bytes (the contract's ``keccak256(bytes(reason))``)."""
        return keccak(self.reason.encode("utf-8"))

    def signable(self, domain: Eip712Domain) -> SignableMessage:
        """Return the EIP-712 message for this rollback under ``domain``."""
        return domain.signable(
            ROUND_ROLLBACK_TYPES,
            {
                "round": self.round,
                "keptModelHash": self.kept_model_hash,
                "committeeRoot": self.committee_root,
                "stateRoot": self.state_root,
                "reasonHash": self.reason_hash,
            },
        )

    def as_contract_tuple(self) -> tuple[int, bytes, bytes, bytes, bytes]:
        """Return the rollback as the ABI tuple ``recordRollback`` takes."""
        return (
            self.round,
            self.kept_model_hash,
            self.committee_root,
            self.state_root,
            self.reason_hash,
        )

    def to_config_record(self) -> ConfigRecord:
        """Return the rollback as a ConfigRecord, for a miner duty message."""
        return ConfigRecord(
            {
                "round": self.round,
                "kept-model-hash": self.kept_model_hash,
                "committee-root": self.committee_root,
                "state-root": self.state_root,
                "reason": self.reason,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> RoundRollback:
        """Parse a rollback written by :meth:`to_config_record`.

        Raises
        ------
        ValueError
            If a field is missing or has the wrong type, naming the field.
        """
        return cls(**typed_fields(record, "rollback", cls._FIELDS))

    _FIELDS: ClassVar[tuple[tuple[str, type], ...]] = (
        ("round", int),
        ("kept-model-hash", bytes),
        ("committee-root", bytes),
        ("state-root", bytes),
        ("reason", str),
    )


def sort_committee(miners: Iterable[str]) -> list[str]:
    """Return the miners' checksummed addresses in the contract's order (ascending).

    Raises
    ------
    ValueError
        If an entry is not an address or an address appears twice.
    """
    addresses = []
    for miner in miners:
        if not isinstance(miner, str) or not is_address(miner):
            raise ValueError(f"miner {miner!r} is not an address")
        addresses.append(to_checksum_address(miner))
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"committee lists a miner twice: {addresses}")
    return sorted(addresses, key=lambda address: int(address, 16))


def committee_root(miners: Iterable[str]) -> bytes:
    """Return the contract's committee root of ``miners``.

    It is ``keccak256`` of the addresses in ascending order, each left-padded to 32
    bytes, which is Solidity's ``keccak256(abi.encodePacked(address[]))``.
    """
    ordered = sort_committee(miners)
    return keccak(b"".join(bytes.fromhex(address[2:]).rjust(32, b"\0") for address in ordered))
