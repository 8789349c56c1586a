"""Quorum certificates as the contract takes them, and rounds as the chain returns them.

:meth:`AnchorCertificate.build` checks the miners' EIP-712 signatures off chain (a
faulty miner's signature is dropped, not fatal) before the contract checks them again
on chain with the same ``ceil(2N/3)`` quorum. A commit's certificate signs a
:class:`~bcsfl_flower.approvals.RoundApproval`, a rollback's a
:class:`~bcsfl_flower.approvals.RoundRollback`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from flwr.common.logger import log

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
    committee_root,
    sort_committee,
)
from bcsfl_flower.committee import quorum_size
from bcsfl_flower.packets import (
    Eip712Domain,
    from_hex,
    to_hex,
)

quorum = quorum_size
"""The contract's quorum for a committee of ``N`` miners, ``ceil(2N/3)``: the same rule
as the validators' vote (:func:`bcsfl_flower.committee.quorum_size`)."""


Attestation = RoundApproval | RoundRollback
"""What a certificate certifies: a commit (``anchorRound``) or a rollback (``recordRollback``)."""


@dataclass(frozen=True)
class AnchorCertificate:
    """A round's quorum certificate in the form ``anchorRound`` or ``recordRollback`` takes.

    Attributes
    ----------
    approval : RoundApproval | RoundRollback
        The statement every signer signed.
    committee : tuple[str, ...]
        The round's miners, ascending (the contract's order).
    signers : tuple[str, ...]
        The approving miners, ascending.
    signatures : tuple[bytes, ...]
        Their 65-byte signatures, aligned with ``signers``.
    """

    approval: Attestation
    committee: tuple[str, ...]
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]

    @classmethod
    def build(
        cls,
        approval: Attestation,
        committee: Iterable[str],
        signatures: Mapping[str, bytes],
        domain: Eip712Domain,
    ) -> AnchorCertificate:
        """Check miners' approvals off chain and assemble a certificate.

        Each signature is recovered under ``domain``; one that does not recover to the
        address it is filed under, or whose signer is not in the committee, is dropped
        with a warning (a faulty miner must not sink the round). The certificate keeps
        exactly ``ceil(2N/3)`` valid approvals, those of the lowest signer addresses: the
        contract needs no more, and each further signature would cost ~4.9k gas to
        recover on chain while proving nothing the quorum does not.

        Parameters
        ----------
        approval : RoundApproval | RoundRollback
            The statement sent to the miners.
        committee : Iterable[str]
            All miners drawn for the round, in any order.
        signatures : Mapping[str, bytes]
            Signature by claimed signer address, e.g.
            ``dict(zip(qc.signers, qc.signatures))`` of a consensus QuorumCertificate.
        domain : Eip712Domain
            The trail's domain (``AuditTrail.domain``).

        Raises
        ------
        ValueError
            If ``approval.committee_root`` is not the committee's root, or fewer than
            ``ceil(2N/3)`` valid approvals remain.
        """
        members = tuple(sort_committee(committee))
        if not members:
            raise ValueError("the committee is empty")
        expected_root = committee_root(members)
        if approval.committee_root != expected_root:
            raise ValueError(
                f"approval.committee_root 0x{approval.committee_root.hex()} is not the root "
                f"0x{expected_root.hex()} of the committee {list(members)}"
            )
        valid: dict[str, bytes] = {}
        for claimed, signature in signatures.items():
            try:
                signer = approval.recover(bytes(signature), domain)
            except (ValueError, TypeError) as err:
                log(WARNING, "Dropping approval filed under %s: %s", claimed, err)
                continue
            if not is_address(claimed) or signer != to_checksum_address(claimed):
                log(WARNING, "Dropping approval filed under %s: signed by %s", claimed, signer)
                continue
            if signer not in members:
                log(WARNING, "Dropping approval of %s: not in the round's committee", signer)
                continue
            valid[signer] = bytes(signature)
        required = quorum(len(members))
        if len(valid) < required:
            raise ValueError(
                f"round {approval.round}: {len(valid)} valid approvals of {len(members)} "
                f"miners, quorum is {required}"
            )
        signers = tuple(sort_committee(valid))[:required]
        return cls(approval, members, signers, tuple(valid[s] for s in signers))

    @classmethod
    def operator_signed(
        cls, approval: Attestation, operator: LocalAccount, domain: Eip712Domain
    ) -> AnchorCertificate:
        """Return the fallback certificate signed by the operator alone.

        For a rollback that no miner can sign (the round drew no committee, or its
        miners did not answer), and for the rounds of a federation whose clients cannot
        mine (no bcsfl client mod; the contract accepts those only when deployed with
        ``operatorCertifies``): the committee is the operator, and
        ``approval.committee_root`` must be ``committee_root([operator.address])``. The
        audit trail then shows the round was certified by the operator, not by clients.
        """
        return cls.build(
            approval,
            [operator.address],
            {operator.address: approval.sign(operator, domain)},
            domain,
        )

    @property
    def packed_signatures(self) -> bytes:
        """The signatures concatenated in signer order, as ``anchorRound`` takes them."""
        return b"".join(self.signatures)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly record (hex strings); :meth:`from_dict` reverses it."""
        return {
            **_attestation_dict(self.approval),
            "committee": list(self.committee),
            "signers": list(self.signers),
            "signatures": [to_hex(signature) for signature in self.signatures],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnchorCertificate:
        """Rebuild a certificate from :meth:`to_dict`, e.g. ``ChainUnavailableError.resume``.

        Raises
        ------
        ValueError
            If a field is missing or malformed, naming it.
        """
        try:
            approval: Attestation
            if "kept_model_hash" in data:
                approval = RoundRollback(
                    round=int(data["round"]),
                    kept_model_hash=from_hex(data["kept_model_hash"]),
                    committee_root=from_hex(data["committee_root"]),
                    state_root=from_hex(data["state_root"]),
                    reason=str(data["reason"]),
                )
            else:
                approval = RoundApproval(
                    round=int(data["round"]),
                    model_hash=from_hex(data["model_hash"]),
                    previous_hash=from_hex(data["previous_hash"]),
                    accepted_root=from_hex(data["accepted_root"]),
                    committee_root=from_hex(data["committee_root"]),
                    state_root=from_hex(data["state_root"]),
                    timestamp=int(data["timestamp"]),
                )
            return cls(
                approval,
                tuple(to_checksum_address(a) for a in data["committee"]),
                tuple(to_checksum_address(a) for a in data["signers"]),
                tuple(from_hex(signature) for signature in data["signatures"]),
            )
        except KeyError as err:
            raise ValueError(f"certificate record lacks the field {err.args[0]!r}") from err


@dataclass(frozen=True)
class AnchoredRound:
    """One anchored round, as read back from the chain."""

    approval: RoundApproval
    committee: tuple[str, ...]
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]
    tx_hash: str
    block_number: int
    gas_used: int

    @property
    def round(self) -> int:
        """The round number."""
        return self.approval.round

    @property
    def model_hash(self) -> bytes:
        """The anchored model hash."""
        return self.approval.model_hash

    @property
    def state_root(self) -> bytes:
        """Hash of the round's state statement."""
        return self.approval.state_root

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly record (hex strings)."""
        return {
            **_attestation_dict(self.approval),
            "committee": list(self.committee),
            "signers": list(self.signers),
            "signatures": [to_hex(signature) for signature in self.signatures],
            "tx_hash": self.tx_hash,
            "block_number": self.block_number,
            "gas_used": self.gas_used,
        }


@dataclass(frozen=True)
class RolledBackRound:
    """One rolled-back round, as read back from the chain, with its certificate."""

    rollback: RoundRollback
    committee: tuple[str, ...]
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]
    tx_hash: str
    block_number: int

    @property
    def round(self) -> int:
        """The round number."""
        return self.rollback.round

    @property
    def kept_model_hash(self) -> bytes:
        """The model the federation kept."""
        return self.rollback.kept_model_hash

    @property
    def state_root(self) -> bytes:
        """Hash of the round's state statement."""
        return self.rollback.state_root

    @property
    def reason(self) -> str:
        """Why the round rolled back, as its certificate signs it."""
        return self.rollback.reason

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly record (hex strings)."""
        return {
            **_attestation_dict(self.rollback),
            "committee": list(self.committee),
            "signers": list(self.signers),
            "signatures": [to_hex(signature) for signature in self.signatures],
            "tx_hash": self.tx_hash,
            "block_number": self.block_number,
        }


def _attestation_dict(approval: Attestation) -> dict[str, Any]:
    if isinstance(approval, RoundRollback):
        return {
            "round": approval.round,
            "kept_model_hash": to_hex(approval.kept_model_hash),
            "committee_root": to_hex(approval.committee_root),
            "state_root": to_hex(approval.state_root),
            "reason": approval.reason,
        }
    return _approval_dict(approval)


def _approval_dict(approval: RoundApproval) -> dict[str, Any]:
    return {
        "round": approval.round,
        "model_hash": to_hex(approval.model_hash),
        "previous_hash": to_hex(approval.previous_hash),
        "accepted_root": to_hex(approval.accepted_root),
        "committee_root": to_hex(approval.committee_root),
        "state_root": to_hex(approval.state_root),
        "timestamp": approval.timestamp,
    }
