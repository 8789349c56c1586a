"""Two-thirds consensus: vote tallies, rollback decisions and quorum certificates.

A BCS-FL round commits a new global model only when at least two thirds of the
committee agree; otherwise it rolls back to the previous model. Two thirds is the
classic Byzantine fault-tolerance bound: with ``n`` members of which fewer than ``n/3``
are faulty, any two quorums of ``ceil(2n/3)`` overlap in at least one honest member, so
two conflicting decisions cannot both gather a quorum.

The quorum is always measured against the members that were *drawn* for the committee,
not against those that happened to reply. A validator that drops out therefore counts
against the candidate, exactly like an explicit "no": otherwise an attacker could shrink
the quorum by keeping honest validators from replying.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from eth_utils import is_checksum_address

TRUSTED_MEAN_CANDIDATE = "trusted-mean"
"""Candidate id recorded for the aggregate in the ``trusted-mean`` selection mode."""

_HASH_BYTES = 32
_SIGNATURE_BYTES = 65
_ADDRESS_PATTERN = re.compile(r"0x[0-9a-fA-F]{40}")


def quorum_size(n: int) -> int:
    """Return the number of approvals a committee of ``n`` members needs: ``ceil(2n/3)``.

    Computed as ``(2n + 2) // 3`` in integer arithmetic, so no float rounding can move
    the boundary (n=3 needs 2, n=4 needs 3, n=5 needs 4, n=6 needs 4, n=7 needs 5).

    Raises
    ------
    ValueError
        If ``n < 1``: an empty committee cannot approve anything, and ``ceil(0) = 0``
        would approve everything.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}: {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (committee size), got {n}")
    return (2 * n + 2) // 3


@dataclass(frozen=True)
class ConsensusDecision:
    """The outcome of one round's vote.

    Attributes
    ----------
    committed : bool
        True if a candidate reached the quorum and becomes the next global model;
        False means roll back to the previous global model.
    candidate : str | None
        The committed candidate's id, or None on rollback.
    votes_for : int
        Votes for the committed candidate, or, on rollback, for the candidate with the
        most votes (0 if nobody voted for anything).
    quorum : int
        Votes needed, ``quorum_size(num_validators)``; 0 when no validators were drawn.
    num_validators : int
        Validators drawn for the committee.
    reason : str
        Human-readable explanation for the results record.
    """

    committed: bool
    candidate: str | None
    votes_for: int
    quorum: int
    num_validators: int
    reason: str


def _check_num_validators(num_validators: int, num_ballots: int) -> None:
    if isinstance(num_validators, bool) or not isinstance(num_validators, int):
        raise TypeError(f"num_validators must be an int, got {num_validators!r}")
    if num_validators < 0:
        raise ValueError(f"num_validators must be >= 0, got {num_validators}")
    if num_ballots > num_validators:
        raise ValueError(
            f"got {num_ballots} ballots but only {num_validators} validators were drawn"
        )


def _check_voter(validator_id: object) -> None:
    if not isinstance(validator_id, str) or not validator_id:
        raise TypeError(f"validator ids must be non-empty str, got {validator_id!r}")


def _no_validators() -> ConsensusDecision:
    return ConsensusDecision(
        committed=False,
        candidate=None,
        votes_for=0,
        quorum=0,
        num_validators=0,
        reason="rollback: no validators in the committee",
    )


def tally_votes(votes: Mapping[str, str | None], num_validators: int) -> ConsensusDecision:
    """Count the paper mode's votes: each validator names the candidate it prefers.

    A candidate is committed when at least ``quorum_size(num_validators)`` validators
    vote for that same candidate. A None vote is an abstention, and a validator missing
    from ``votes`` (dropped out, timed out, sent a bad reply) is treated the same: both
    count against every candidate. Split votes roll back.

    Parameters
    ----------
    votes : Mapping[str, str | None]
        Validator id -> candidate id voted for, or None to abstain.
    num_validators : int
        Validators drawn for the committee (not the number that replied).

    Returns
    -------
    ConsensusDecision
        Commit or rollback, with the reason.
    """
    _check_num_validators(num_validators, len(votes))
    for validator_id, choice in votes.items():
        _check_voter(validator_id)
        if choice is not None and (not isinstance(choice, str) or not choice):
            raise TypeError(
                f"vote of validator {validator_id!r} must be a candidate id (str) or None, "
                f"got {choice!r}"
            )
    if num_validators == 0:
        return _no_validators()
    quorum = quorum_size(num_validators)
    counts = Counter(choice for choice in votes.values() if choice is not None)
    not_voting = num_validators - sum(counts.values())
    if not votes:
        reason = f"rollback: no validator replied (0/{num_validators}, quorum {quorum})"
        return ConsensusDecision(False, None, 0, quorum, num_validators, reason)
    if not counts:
        reason = (
            f"rollback: all {num_validators} validators abstained or did not reply, quorum {quorum}"
        )
        return ConsensusDecision(False, None, 0, quorum, num_validators, reason)
    # Most votes first; equal counts in id order, so the reason string is deterministic.
    ranking = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    leader, leader_votes = ranking[0]
    if leader_votes >= quorum:
        reason = (
            f"commit: {leader_votes}/{num_validators} votes for candidate {leader!r}, "
            f"quorum {quorum}"
        )
        return ConsensusDecision(True, leader, leader_votes, quorum, num_validators, reason)
    tally = ", ".join(f"{candidate!r}: {count}" for candidate, count in ranking)
    reason = (
        f"rollback: no candidate reached quorum {quorum} of {num_validators} validators "
        f"(votes {tally}; {not_voting} abstained or did not reply)"
    )
    return ConsensusDecision(False, None, leader_votes, quorum, num_validators, reason)


def tally_accepts(
    accepts: Mapping[str, bool],
    num_validators: int,
    *,
    candidate: str = TRUSTED_MEAN_CANDIDATE,
) -> ConsensusDecision:
    """Count the trusted-mean mode's accept/reject votes on the single candidate.

    The candidate is committed when at least ``quorum_size(num_validators)`` validators
    accept it. Rejections and missing replies count against it.

    Parameters
    ----------
    accepts : Mapping[str, bool]
        Validator id -> True (accept) or False (reject).
    num_validators : int
        Validators drawn for the committee (not the number that replied).
    candidate : str (default: ``"trusted-mean"``)
        Id recorded for the candidate when it is committed.

    Returns
    -------
    ConsensusDecision
        Commit or rollback, with the reason.
    """
    _check_num_validators(num_validators, len(accepts))
    for validator_id, accepted in accepts.items():
        _check_voter(validator_id)
        if not isinstance(accepted, bool | np.bool_):
            raise TypeError(
                f"accept vote of validator {validator_id!r} must be a bool, got {accepted!r}"
            )
    if not isinstance(candidate, str) or not candidate:
        raise TypeError(f"candidate must be a non-empty str, got {candidate!r}")
    if num_validators == 0:
        return _no_validators()
    quorum = quorum_size(num_validators)
    if not accepts:
        reason = f"rollback: no validator replied (0/{num_validators}, quorum {quorum})"
        return ConsensusDecision(False, None, 0, quorum, num_validators, reason)
    votes_for = sum(bool(accepted) for accepted in accepts.values())
    missing = num_validators - len(accepts)
    summary = f"{votes_for}/{num_validators} accept votes, quorum {quorum}"
    if missing:
        summary += f", {missing} did not reply"
    if votes_for >= quorum:
        return ConsensusDecision(
            True, candidate, votes_for, quorum, num_validators, f"commit: {summary}"
        )
    return ConsensusDecision(False, None, votes_for, quorum, num_validators, f"rollback: {summary}")


@dataclass(frozen=True)
class QuorumCertificate:
    """Miners' approvals of one round's model, as anchored on chain.

    A plain, validated data container: the EIP-712 digest the miners sign, signature
    recovery and the Solidity contract that checks the certificate live elsewhere.

    Attributes
    ----------
    server_round : int
        The round the certificate approves (>= 0).
    model_hash : bytes
        32-byte hash of the round's global model.
    previous_hash : bytes
        32-byte hash of the previous round's anchored model, which links the chain of
        rounds.
    signers : tuple[str, ...]
        Distinct EIP-55 checksummed Ethereum addresses of the approving miners.
    signatures : tuple[bytes, ...]
        One 65-byte signature (r, s, v) per signer, in the same order.
    """

    server_round: int
    model_hash: bytes
    previous_hash: bytes
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int):
            raise TypeError(f"server_round must be an int, got {self.server_round!r}")
        if self.server_round < 0:
            raise ValueError(f"server_round must be >= 0, got {self.server_round}")
        for name in ("model_hash", "previous_hash"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != _HASH_BYTES:
                raise ValueError(f"{name} must be {_HASH_BYTES} bytes, got {value!r}")
        if not isinstance(self.signers, tuple) or not isinstance(self.signatures, tuple):
            raise TypeError("signers and signatures must be tuples")
        if len(self.signers) != len(self.signatures):
            raise ValueError(f"{len(self.signers)} signers but {len(self.signatures)} signatures")
        for signer in self.signers:
            if (
                not isinstance(signer, str)
                or not _ADDRESS_PATTERN.fullmatch(signer)
                or not is_checksum_address(signer)
            ):
                raise ValueError(f"signer {signer!r} is not a checksummed Ethereum address")
        if len(set(self.signers)) != len(self.signers):
            raise ValueError(f"signers contain duplicates: {list(self.signers)}")
        for signer, signature in zip(self.signers, self.signatures, strict=True):
            if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
                raise ValueError(
                    f"signature of {signer} must be {_SIGNATURE_BYTES} bytes (r, s, v), "
                    f"got {len(signature) if isinstance(signature, bytes) else signature!r}"
                )

    def is_complete(self, num_miners: int) -> bool:
        """Return whether at least ``quorum_size(num_miners)`` miners signed.

        ``num_miners`` is the number of miners drawn for the committee, so miners that
        did not sign count against the certificate.
        """
        if isinstance(num_miners, int) and len(self.signers) > num_miners >= 1:
            raise ValueError(
                f"certificate has {len(self.signers)} signers but only {num_miners} miners"
            )
        return len(self.signers) >= quorum_size(num_miners)

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-friendly record with ``0x``-prefixed hex strings."""
        return {
            "server_round": self.server_round,
            "model_hash": "0x" + self.model_hash.hex(),
            "previous_hash": "0x" + self.previous_hash.hex(),
            "signers": list(self.signers),
            "signatures": ["0x" + signature.hex() for signature in self.signatures],
        }
