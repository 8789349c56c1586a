"""The frozen results that the stages of a round hand to each other.

A round is a straight pipeline (:mod:`bcsfl_flower.round.pipeline`)::

    replies -> CheckedReplies -> Bounds -> Screening -> Committee -> CandidateSet
            -> ValidatorReport(s) -> Decision -> Certification -> Settlement -> RoundRecord

Each stage takes the results of the stages before it and returns one of these; no
stage reads another's log or the JSON record back. :class:`RoundRecord` is assembled
once, at the end, and is what the round sink and Flower's MetricRecord are made from.

Row indices (``int``) refer to the order of :attr:`CheckedReplies.accepted`; client
names (``str``) are Flower node ids as strings, as the stake ledger keys them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from bcsfl_flower.committee import Committee
from bcsfl_flower.packets import SignedModelPacket, to_hex
from bcsfl_flower.protocol import DP_EPSILON_KEY, serves_duty
from bcsfl_flower.round.timing import StageTimes


@dataclass(frozen=True)
class Contribution:
    """A training reply that passed every check on its own.

    Attributes
    ----------
    node_id : int
        The sender's Flower node id.
    num_examples : float
        The example count it reports (finite and > 0; capped later by the bounds).
    metrics : MetricRecord
        Its training metrics.
    content : RecordDict
        The whole reply content (for ``train_metrics_aggr_fn``).
    packet : SignedModelPacket | None
        Its verified signed packet, or None for an unsigned reply.
    """

    node_id: int
    num_examples: float
    metrics: MetricRecord
    content: RecordDict
    packet: SignedModelPacket | None = None

    @property
    def name(self) -> str:
        """The node id as the ledger and the record key it."""
        return str(self.node_id)

    @property
    def address(self) -> str | None:
        """The client's Ethereum address, known from a verified packet."""
        return None if self.packet is None else self.packet.packet.client

    @property
    def serves_duty(self) -> bool:
        """Whether the client runs the bcsfl mod: it signed, or its reply says so.

        Such a committee member gets one duty message instead of one evaluate message
        per model. A client that claims it falsely only spoils its own answers.
        """
        return self.packet is not None or serves_duty(self.content)


class UpdateBatch(ABC):
    """One round's accepted updates as an update space holds them (plaintext or CKKS).

    Only the space that made a batch reads it; the pipeline passes it back to the
    space's :meth:`~bcsfl_flower.round.space.UpdateSpace.gram` and
    :meth:`~bcsfl_flower.round.space.UpdateSpace.combine`, which are typed on the
    space's own batch class.
    """

    sketch_seed: int | None = None
    """Seed of the screening's random direction sketch, kept so the round can be replayed
    (None where updates are compared exactly)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of updates."""


@dataclass(frozen=True)
class CheckedReplies:
    """The check stage: which replies were accepted, which rejected and why.

    Attributes
    ----------
    accepted : tuple[Contribution, ...]
        Accepted replies; their row order is the order of every later matrix.
    rejected : Mapping[str, str]
        Node id -> reason, for replies rejected on their own.
    batch : UpdateBatch
        The accepted updates, in the update space's representation.
    """

    accepted: tuple[Contribution, ...]
    rejected: Mapping[str, str]
    batch: UpdateBatch

    @property
    def names(self) -> tuple[str, ...]:
        """Node ids of the accepted replies, in row order."""
        return tuple(c.name for c in self.accepted)


@dataclass(frozen=True)
class GramResult:
    """The inner products of a round's updates, or why there are none.

    Attributes
    ----------
    matrix : np.ndarray | None
        ``(n, n)`` float64 inner products of the raw updates; None when the
        encrypted space's key holders did not agree on one.
    reason : str
        How the matrix was obtained, or why not.
    record : Mapping[str, Any] | None
        Details for the round record (the CKKS decryption committee's answers).
    """

    matrix: np.ndarray | None
    reason: str
    record: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Bounds:
    """The bound stage: how far each update may pull and how much each may weigh.

    Attributes
    ----------
    norms : np.ndarray
        ``||d_k||`` of every accepted update.
    norm_bound : float
        Stake-weighted median of the norms; longer updates are scaled down to it.
    clip : np.ndarray
        ``min(1, norm_bound / ||d_k||)`` per update.
    stakes : np.ndarray
        Each client's stake at the start of the round.
    example_cap : float
        Largest example count any reply is credited with.
    weights : np.ndarray
        Aggregation weight per update: ``min(num_examples, example_cap) * stake``.
    """

    norms: np.ndarray
    norm_bound: float
    clip: np.ndarray
    stakes: np.ndarray
    example_cap: float
    weights: np.ndarray

    def clipped_gram(self, gram: np.ndarray) -> np.ndarray:
        """Return the inner products of the clipped updates, ``C G C``."""
        return gram * np.outer(self.clip, self.clip)


@dataclass(frozen=True)
class Screening:
    """The screen stage: the trusted cluster and why everyone else is out.

    Attributes
    ----------
    trusted : tuple[int, ...]
        Rows of the trusted clients, ascending.
    reasons : tuple[str, ...]
        One reason per row (trusted rows say why they are trusted).
    split_threshold : float
        Average-linkage distance above which a split counts as two groups.
    split : bool
        Whether the direction test set a group apart (the trusted cluster is not
        everyone left after the length test).
    contested : bool
        Whether the trusted clients form two disagreeing groups and neither holds the
        qualified share of the stake, so the screen could not choose between them.
    set_apart : tuple[int, ...]
        Rows the direction test alone set apart (their length passed), ascending. A
        group that differs is not yet a group that harms: the validators score the
        federation with them, and they are rejected only if that candidate loses.
    """

    trusted: tuple[int, ...]
    reasons: tuple[str, ...]
    split_threshold: float
    split: bool = False
    contested: bool = False
    set_apart: tuple[int, ...] = ()

    @property
    def rejected(self) -> tuple[int, ...]:
        """Rows of the rejected clients, ascending."""
        trusted = set(self.trusted)
        return tuple(i for i in range(len(self.reasons)) if i not in trusted)

    @property
    def committee_pool(self) -> tuple[int, ...]:
        """Rows the round's committee is drawn from: the trusted and the set-apart, ascending.

        A set-apart group is kept or left out by the validators' losses, so it must be
        able to sit on the committee: drawn from the trusted side alone, the validators
        never hold the group's own classes and always prefer the model fitted to theirs
        (``docs/constants.md``). Clients rejected outright (too long, or in a
        coordinated group) do not validate.
        """
        return tuple(sorted(set(self.trusted) | set(self.set_apart)))


@dataclass(frozen=True)
class CandidatePlan:
    """What the validators will score: named weightings of the accepted updates.

    Candidate ``c`` is ``w_t + sum_k coefficients[c, k] * d_k``, so plaintext and
    encrypted updates build candidates the same way.

    Attributes
    ----------
    names : tuple[str, ...]
        Candidate names, in order of preference.
    coefficients : np.ndarray
        ``(num_candidates, n)`` weights of the raw updates (clipping included).
    supports : tuple[tuple[int, ...], ...]
        Rows each candidate draws on (stake rewards go to a committed one's support).
    fallback_suspects : tuple[int, ...]
        Rows to slash if no candidate commits: the trusted clients the most robust
        candidate leaves out, so a rollback changes the next round. Empty when the
        screen could not tell groups apart: then there is no basis to slash anyone.
    owners : tuple[str | None, ...]
        For a candidate that is one client's model, that client's node id (a validator
        does not propose its own model); empty when no candidate has a single owner.
    contested : bool
        Whether the screen left the round contested (:attr:`Screening.contested`): the
        plan's first candidate then commits even without the validators' quorum.
    parties : tuple[str, ...]
        Node ids of the set-apart clients. They may validate (they hold the data that
        show what leaving them out costs) but are a party to the round's question:
        they count towards the quorum of the candidate that includes them, not of the
        candidates that leave them out.
    """

    names: tuple[str, ...]
    coefficients: np.ndarray
    supports: tuple[tuple[int, ...], ...]
    fallback_suspects: tuple[int, ...] = ()
    owners: tuple[str | None, ...] = ()
    contested: bool = False
    parties: tuple[str, ...] = ()


@dataclass(frozen=True)
class CandidateSet:
    """The candidates as models, ready to be validated."""

    plan: CandidatePlan
    arrays: tuple[ArrayRecord, ...]

    def by_name(self) -> dict[str, ArrayRecord]:
        """Candidate name -> model."""
        return dict(zip(self.plan.names, self.arrays, strict=True))


@dataclass(frozen=True)
class ValidatorReport:
    """What one validator said about the current model and each candidate.

    Attributes
    ----------
    validator : str
        The validator's node id.
    baseline_loss : float
        Its loss on ``w_t``; NaN if it did not report one.
    candidate_losses : Mapping[str, float]
        Its loss on each candidate; NaN where it did not report one.
    problems : tuple[str, ...]
        Why some losses are missing.
    """

    validator: str
    baseline_loss: float
    candidate_losses: Mapping[str, float]
    problems: tuple[str, ...] = ()

    def delta(self, candidate: str) -> float:
        """``dE = loss(w_t) - loss(candidate)``: > 0 means the candidate helps; NaN if unknown."""
        return self.baseline_loss - self.candidate_losses.get(candidate, math.nan)


@dataclass(frozen=True)
class Decision:
    """The decide stage: which candidate, if any, reached the 2/3 quorum.

    Attributes
    ----------
    committed : bool
        Whether a candidate becomes the next global model.
    candidate : str | None
        The committed candidate's name.
    votes_for : int
        Accept votes of the committed candidate (of the best one on rollback).
    quorum : int
        Votes needed, ``ceil(2M/3)`` of the ``M`` validators drawn.
    num_validators : int
        Validators drawn.
    reason : str
        Human-readable explanation.
    ballots : Mapping[str, Any]
        Per-validator detail for the record.
    support : tuple[int, ...]
        Rows whose updates the committed model draws on.
    suspects : tuple[int, ...]
        Rows slashed because the round rolled back.
    """

    committed: bool
    candidate: str | None
    votes_for: int
    quorum: int
    num_validators: int
    reason: str
    ballots: Mapping[str, Any] = field(default_factory=dict)
    support: tuple[int, ...] = ()
    suspects: tuple[int, ...] = ()

    @classmethod
    def commit(
        cls,
        candidate: str,
        support: Sequence[int],
        *,
        votes_for: int,
        quorum: int,
        num_validators: int,
        reason: str,
        ballots: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Return the decision to commit ``candidate``, drawn from the rows ``support``."""
        return cls(
            committed=True,
            candidate=candidate,
            votes_for=votes_for,
            quorum=quorum,
            num_validators=num_validators,
            reason=reason,
            ballots=dict(ballots or {}),
            support=tuple(support),
        )

    @classmethod
    def rollback(
        cls,
        reason: str,
        *,
        votes_for: int = 0,
        quorum: int = 0,
        num_validators: int = 0,
        ballots: Mapping[str, Any] | None = None,
        suspects: Sequence[int] = (),
    ) -> Decision:
        """Return the decision to keep the global model (no votes unless given)."""
        return cls(
            committed=False,
            candidate=None,
            votes_for=votes_for,
            quorum=quorum,
            num_validators=num_validators,
            reason=reason,
            ballots=dict(ballots or {}),
            suspects=tuple(suspects),
        )


@dataclass(frozen=True)
class Certification:
    """How the miners certified the committed candidate, or why they could not.

    Attributes
    ----------
    certified : bool
        Whether a quorum certificate exists.
    certified_by : str
        ``"miners"``, ``"operator"`` (no miner runs the mod) or ``"none"``.
    refusals : Mapping[str, str]
        Miner node id -> why it did not sign.
    certificate : Any
        The :class:`~bcsfl_flower.chain.certificates.AnchorCertificate`, if any.
    refusal : Any
        Where a commit failed, the certificate of a quorum of the miners' signed
        refusals: the round's rollback, certified by them rather than by the operator.
    """

    certified: bool
    certified_by: str
    refusals: Mapping[str, str] = field(default_factory=dict)
    certificate: Any = None
    refusal: Any = None


@dataclass(frozen=True)
class Settlement:
    """The settle stage: the stake table before and after the round.

    Attributes
    ----------
    before, after : Mapping[str, float]
        Node id -> stake.
    rewarded, slashed : tuple[str, ...]
        Who gained and who lost stake.
    """

    before: Mapping[str, float]
    after: Mapping[str, float]
    rewarded: tuple[str, ...]
    slashed: tuple[str, ...]


@dataclass(frozen=True)
class RoundRecord:
    """Everything one round decided, written once at the end.

    Stages that did not run (for example screening when no reply was valid) are None.
    """

    server_round: int
    previous_hash: bytes
    model_hash: bytes
    arrays: ArrayRecord
    checked: CheckedReplies
    decision: Decision
    settlement: Settlement
    bounds: Bounds | None = None
    gram: GramResult | None = None
    screening: Screening | None = None
    committee: Committee | None = None
    candidates: CandidateSet | None = None
    reports: tuple[ValidatorReport, ...] = ()
    certification: Certification | None = None
    anchoring: Mapping[str, Any] | None = None
    client_metrics: MetricRecord | None = None
    timing: StageTimes | None = None
    rejections: Mapping[str, str] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        """Whether the round's candidate became the next global model."""
        return self.decision.committed

    def rejected(self) -> dict[str, str]:
        """Return node id -> reason for every client rejected, as the statement records it.

        The pipeline fills ``rejections`` from the round statement
        (:func:`rejected_clients`), so results.json says what is anchored.
        """
        return dict(self.rejections)

    def trusted(self) -> tuple[str, ...]:
        """Node ids of the trusted clients."""
        if self.screening is None:
            return ()
        return tuple(self.checked.names[row] for row in self.screening.trusted)

    @property
    def max_dp_epsilon(self) -> float | None:
        """The largest epsilon an accepted DP client reports (None without DP clients).

        A federation's privacy guarantee is its weakest client's.
        """
        epsilons = [
            # the check stage accepted only replies whose epsilon is a finite number
            float(c.metrics[DP_EPSILON_KEY])  # type: ignore[arg-type]
            for c in self.checked.accepted
            if DP_EPSILON_KEY in c.metrics
        ]
        return max(epsilons) if epsilons else None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-serialisable record the round sink receives."""
        names = self.checked.names
        record: dict[str, Any] = {
            "clients": {c.name: _scalar_metrics(c.metrics) for c in self.checked.accepted},
            "rejected": self.rejected(),
            "trusted": sorted(self.trusted()),
            "signed": sorted(c.name for c in self.checked.accepted if c.packet is not None),
            "addresses": {c.name: c.address for c in self.checked.accepted if c.address},
            "previous_hash": to_hex(self.previous_hash),
            "outcome": "commit" if self.committed else "rollback",
            "reason": self.decision.reason,
            "candidate": self.decision.candidate,
            "votes_for": self.decision.votes_for,
            "quorum": self.decision.quorum,
            "votes": dict(self.decision.ballots),
            "model_hash": to_hex(self.model_hash),
            "stakes": dict(self.settlement.after),
            "stakes_before": dict(self.settlement.before),
            "rewarded": list(self.settlement.rewarded),
            "slashed": list(self.settlement.slashed),
        }
        if self.bounds is not None:
            record["bounds"] = {
                "norm_bound": self.bounds.norm_bound,
                "example_cap": self.bounds.example_cap,
                "clipped": sorted(names[i] for i in np.flatnonzero(self.bounds.clip < 1.0)),
            }
        if self.gram is not None and self.gram.record is not None:
            record["gram"] = dict(self.gram.record)
        if self.committee is not None:
            record["committee"] = self.committee.to_dict()
        if self.candidates is not None:
            record["candidates"] = list(self.candidates.plan.names)
        problems = {r.validator: list(r.problems) for r in self.reports if r.problems}
        if problems:
            record["validator_problems"] = problems
        if self.certification is not None:
            record["mining"] = {
                "certified_by": self.certification.certified_by,
                "refusals": dict(self.certification.refusals),
            }
        if self.anchoring is not None:
            record["chain"] = dict(self.anchoring)
        if self.timing is not None:
            record["timing"] = self.timing.to_json()
        if self.max_dp_epsilon is not None:
            record["max_dp_epsilon"] = self.max_dp_epsilon
        return record


def rejected_clients(
    checked: CheckedReplies, screening: Screening | None, decision: Decision
) -> dict[str, str]:
    """Node id -> reason, for every client rejected by a check or by screening.

    A client the screen set apart is not rejected when the committed candidate drew on
    its update (the validators found the federation better with it). The round's
    statement records the same, under its anchored hash.
    """
    rejected = dict(checked.rejected)
    if screening is not None:
        support = set(decision.support)
        for row in screening.rejected:
            if row not in support:
                rejected[checked.names[row]] = screening.reasons[row]
    return rejected


def _scalar_metrics(metrics: MetricRecord) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
