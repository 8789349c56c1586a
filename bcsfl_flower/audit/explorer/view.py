"""What the explorer page shows of a run: the trail's rounds, each with its proof.

:func:`run_view` reads a run directory through the same functions as ``bcsfl audit
verify`` and ``show``: :func:`~bcsfl_flower.audit.verification.verify_trail` gives every
round's failures (the page marks a round verified only where that report names no
failure for it), the anchored statements give who was accepted, set apart or rejected,
the committee and the ballots, and :func:`~bcsfl_flower.round.conclusion.conclude`
gives the decision the ballots make. Figures only ``results.json`` holds (accuracy and
loss) are carried separately, and the page labels them unverified.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bcsfl_flower.audit.run_results import RESULTS_FILE, RunResults
from bcsfl_flower.audit.verification import TrailReport, load_statement, timeline
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.certificates import AnchoredRound, RolledBackRound
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.packets import to_hex
from bcsfl_flower.round.conclusion import conclude
from bcsfl_flower.round.state import Decision, ValidatorReport
from bcsfl_flower.round.statement import RoundStatement

ACCEPTED = "accepted"
SET_APART = "set apart"
REJECTED = "rejected"
STANDINGS = (ACCEPTED, SET_APART, REJECTED)
"""A client's standing in a round, as the page colours it."""


@dataclass(frozen=True)
class ClientStanding:
    """One client's standing in one round, and why."""

    client: str
    """The client's label: its node id where the trail names it, else its identity."""
    standing: str
    reason: str


@dataclass(frozen=True)
class BallotView:
    """One drawn validator's ballot: the candidates it accepted, and what was wrong."""

    validator: str
    accepted: tuple[str, ...]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class RoundView:
    """One round of the trail as the page shows it.

    ``failures`` are the messages ``verify`` reports for this round; the round is
    verified when there are none. ``accuracy`` and ``loss`` come from ``results.json``
    alone (the operator's word).
    """

    number: int
    outcome: str
    failures: tuple[str, ...]
    model_hash: str
    model_file: str | None
    candidate: str | None
    decision: str
    clients: tuple[ClientStanding, ...]
    validators: tuple[str, ...]
    miners: tuple[str, ...]
    ballots: tuple[BallotView, ...]
    signers: tuple[str, ...]
    block: int
    transaction: str
    stakes: Mapping[str, float]
    """Stake by client when the committee was drawn (from the anchored statement)."""
    accuracy: float | None = None
    loss: float | None = None

    @property
    def verified(self) -> bool:
        """Whether ``verify`` found nothing wrong with this round."""
        return not self.failures


@dataclass(frozen=True)
class RunView:
    """A run: its identity, the verify result and every round."""

    chain_id: int
    backend: str
    contract: str
    run: str
    operator: str
    head_round: int
    head_hash: str
    checks: int
    failures: tuple[str, ...]
    """Failures that concern the run as a whole, not one round."""
    notes: tuple[str, ...]
    rounds: tuple[RoundView, ...]
    settled_stakes: Mapping[str, float] = field(default_factory=dict)
    """The stake table the last round settled, as ``verify`` re-derived it."""
    initial_accuracy: float | None = None
    initial_loss: float | None = None

    @property
    def verified(self) -> bool:
        """Whether ``verify`` passed: no failure for the run or any round."""
        return not self.failures and all(r.verified for r in self.rounds)


def run_view(trail: AuditTrail, manifest: ChainManifest, report: TrailReport) -> RunView:
    """Return the page's view of a run, given the report ``verify_trail`` made of it."""
    store = ModelStore(manifest.models_dir)
    results = RunResults.read(manifest.path.parent / RESULTS_FILE)
    records = timeline(trail)
    statements = {r.round: _statement(store, r.round, r.state_root) for r in records}
    labels = _Labels.of(statements.values())
    by_round: dict[int, list[str]] = {}
    run_failures = []
    for failure in report.failures:
        if failure.round is None or failure.round == 0:
            run_failures.append(failure.message)
        else:
            by_round.setdefault(failure.round, []).append(failure.message)
    rounds = tuple(
        _round_view(
            record,
            statements[record.round],
            trail,
            store,
            labels,
            tuple(by_round.pop(record.round, ())),
            results.rounds.get(str(record.round), {}),
        )
        for record in records
    )
    # a failure naming a round the chain does not have (a results.json record, say)
    run_failures += [f"round {n}: {m}" for n, messages in by_round.items() for m in messages]
    initial = results.rounds.get("0", {})
    return RunView(
        chain_id=manifest.chain_id,
        backend=manifest.backend,
        contract=trail.address,
        run=to_hex(trail.domain.run),
        operator=manifest.operator,
        head_round=report.latest_round,
        head_hash=to_hex(_head_hash(records, manifest)),
        checks=report.checks,
        failures=tuple(run_failures),
        notes=tuple(report.notices()),
        rounds=rounds,
        settled_stakes=labels.table(report.settled.after) if report.settled else {},
        initial_accuracy=_figure(initial, "test_accuracy"),
        initial_loss=_figure(initial, "test_loss"),
    )


def _head_hash(records: list[AnchoredRound | RolledBackRound], manifest: ChainManifest) -> bytes:
    anchored = [r.model_hash for r in records if isinstance(r, AnchoredRound)]
    return anchored[-1] if anchored else manifest.genesis_hash


def _statement(store: ModelStore, number: int, state_root: bytes) -> RoundStatement | None:
    """Return the round's statement, or None where it cannot be read (``verify`` says why)."""
    try:
        return load_statement(store, number, state_root)
    except (KeyError, TypeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class _Labels:
    """Identity -> node id, from every statement's accepted replies (anchored data)."""

    node_of: Mapping[str, str]

    @classmethod
    def of(cls, statements: Iterable[RoundStatement | None]) -> _Labels:
        found: dict[str, str] = {}
        for statement in statements:
            if statement is not None:
                found.update(statement.node_of())
        return cls(found)

    def label(self, identity: str) -> str:
        return self.node_of.get(identity, identity)

    def table(self, stakes: Mapping[str, float]) -> dict[str, float]:
        return {self.label(identity): float(stake) for identity, stake in stakes.items()}


def _round_view(
    record: AnchoredRound | RolledBackRound,
    statement: RoundStatement | None,
    trail: AuditTrail,
    store: ModelStore,
    labels: _Labels,
    failures: tuple[str, ...],
    results: Mapping[str, Any],
) -> RoundView:
    if isinstance(record, AnchoredRound):
        outcome, digest, rollback_reason = "anchored", record.model_hash, ""
    else:
        outcome, digest, rollback_reason = "rolled back", record.kept_model_hash, record.reason
    stored = store.path(digest)
    decision, reports = _decision(statement, trail)
    return RoundView(
        number=record.round,
        outcome=outcome,
        failures=failures,
        model_hash=to_hex(digest),
        model_file=f"{stored.parent.name}/{stored.name}" if stored.is_file() else None,
        candidate=decision.candidate if decision is not None else None,
        decision=decision.reason if decision is not None else rollback_reason,
        clients=_standings(statement, decision, labels),
        validators=tuple(labels.label(v) for v in statement.validators) if statement else (),
        miners=tuple(labels.label(m) for m in statement.miners) if statement else (),
        ballots=_ballots(decision, reports),
        signers=tuple(labels.label(s) for s in record.signers),
        block=record.block_number,
        transaction=record.tx_hash,
        stakes=labels.table(statement.stakes) if statement else {},
        accuracy=_figure(results, "test_accuracy"),
        loss=_figure(results, "test_loss"),
    )


def _decision(
    statement: RoundStatement | None, trail: AuditTrail
) -> tuple[Decision | None, tuple[ValidatorReport, ...]]:
    if statement is None:
        return None, ()
    try:
        return conclude(statement, trail.domain)
    except (KeyError, TypeError, ValueError):
        return None, ()


def _standings(
    statement: RoundStatement | None, decision: Decision | None, labels: _Labels
) -> tuple[ClientStanding, ...]:
    """Every client of the round: accepted (trusted), set apart or rejected, with why."""
    if statement is None:
        return ()
    committed = decision is not None and decision.committed
    rows = decision.support if decision is not None else ()
    in_model = {statement.replies[row].identity for row in rows if row < len(statement.replies)}
    set_apart = set(statement.set_apart)
    standings = []
    for identity in statement.candidates:
        used = "in the committed model" if identity in in_model else "not in the committed model"
        if not committed:
            used = "the round rolled back"
        if identity in set_apart:
            standings.append(
                ClientStanding(labels.label(identity), SET_APART, f"set apart by screening; {used}")
            )
        else:
            standings.append(ClientStanding(labels.label(identity), ACCEPTED, f"trusted; {used}"))
    # the statement names rejected clients by node id, the label the trail gives them
    standings += [ClientStanding(n, REJECTED, why) for n, why in statement.rejected.items()]
    return tuple(standings)


def _ballots(
    decision: Decision | None, reports: tuple[ValidatorReport, ...]
) -> tuple[BallotView, ...]:
    votes: Mapping[str, Any] = decision.ballots if decision is not None else {}
    views = []
    for report in reports:
        cast = votes.get(report.validator, {})
        accepted = tuple(
            name for name, vote in cast.items() if isinstance(vote, dict) and vote.get("accept")
        )
        views.append(BallotView(report.validator, accepted, tuple(report.problems)))
    return tuple(views)


def _figure(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
