"""The round's one decision function: the statement and its ballots in, the decision out.

:func:`conclude` is pure. The pipeline calls it once the validators have answered, the
miners call it before they sign (:mod:`bcsfl_flower.client.mod`), and ``bcsfl audit
verify`` and ``replay`` call it on the stored statement: there is no second
implementation of the decision, so what the round decided is exactly what anyone can
recompute from the signed ballots.

A validator's losses count only from a ballot that checks
(:func:`~bcsfl_flower.ballots.ballot_fault`): signed by the drawn validator's own key,
for this run, round and starting model, one per validator. A validator whose identity
is unsigned (``node:<id>``, admitted only where the federation accepts unsigned
clients) is recorded with its plain losses. Anything else is an abstention, which
counts against every candidate like a "no", and its report says why.

A ballot that did not check when the round ran is recorded with its reason under
:data:`REJECTED_KEY` (:func:`record_ballot_faults`), so the statement says which ballots
count. A recorded ballot that does not check although the statement counts it, or one
that checks although the statement records it as rejected, is tampering, not an
abstention: :func:`false_ballot_records` names it, and ``bcsfl audit verify`` fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bcsfl_flower.approvals import REFUSAL_REASON, rollback_reason
from bcsfl_flower.ballots import SignedBallot, ballot_fault, loss_bits, loss_from_bits
from bcsfl_flower.packets import Eip712Domain
from bcsfl_flower.protocol import BASELINE_CANDIDATE
from bcsfl_flower.round.selection import no_validators, selection_rule
from bcsfl_flower.round.state import Decision, ValidatorReport
from bcsfl_flower.round.statement import UNSIGNED_PREFIX, RoundStatement


def conclude(
    statement: RoundStatement, domain: Eip712Domain | None
) -> tuple[Decision, tuple[ValidatorReport, ...]]:
    """Return the decision the statement's ballots support, and the validators' reports.

    Parameters
    ----------
    statement : RoundStatement
        The round's statement, with its plan and ballots.
    domain : Eip712Domain | None
        The trail's signing domain (None without an audit trail: then no ballot can be
        signed, and every validator's identity is unsigned).

    Returns
    -------
    tuple[Decision, tuple[ValidatorReport, ...]]
        The selection rule's decision, and one report per drawn validator (by node id).
    """
    if statement.plan is None or not statement.plan.names:
        reason = "rollback: no candidates" if statement.replies else "rollback: no valid reply"
        return Decision.rollback(reason), ()
    reports = ballot_reports(statement, domain)
    plan = statement.plan.candidate_plan()
    validators = [report.validator for report in reports]  # node ids, in draw order
    if not validators:
        return no_validators(plan), reports
    rule = selection_rule(statement.settings.selection)
    return rule.decide(plan, reports, validators, statement.settings.vote_tolerance), reports


def stated_rollback_reason(statement: RoundStatement, domain: Eip712Domain | None) -> str:
    """Return the reason a rollback of this round records, recomputed from its statement.

    The decision's own reason where the ballots carry nothing; where they commit, the
    miners refused the commit (:data:`~bcsfl_flower.approvals.REFUSAL_REASON`). The
    miners sign it and ``bcsfl audit verify`` recomputes it, so the reason on chain is
    evidence, not the operator's summary.
    """
    decision, _ = conclude(statement, domain)
    return REFUSAL_REASON if decision.committed else rollback_reason(decision.reason)


REJECTED_KEY = "rejected"
"""Key of a stated ballot that did not check when the round ran; its value says why."""


def record_ballot_faults(statement: RoundStatement, domain: Eip712Domain | None) -> RoundStatement:
    """Return ``statement`` with every ballot that does not check marked rejected, with why."""
    if statement.plan is None:
        return statement
    reader = _reader(statement, domain)
    ballots = []
    for entry in statement.ballots:
        problem = reader.check(_counted(entry), str(entry.get("validator")))
        ballots.append(entry if problem is None else {**entry, REJECTED_KEY: problem})
    return replace(statement, ballots=tuple(ballots))


def false_ballot_records(statement: RoundStatement, domain: Eip712Domain | None) -> list[str]:
    """Return where the statement's record of its ballots is false (empty when it is true).

    Each recorded ballot must be a drawn validator's only one; it must check unless it
    is recorded as rejected, and not check if it is.
    """
    if statement.plan is None:
        return [] if not statement.ballots else ["ballots recorded for a round with no plan"]
    reader = _reader(statement, domain)
    drawn = set(statement.validators)
    problems, seen = [], set()
    for entry in statement.ballots:
        identity = str(entry.get("validator"))
        if identity not in drawn or identity in seen:
            why = "not a drawn validator" if identity not in drawn else "a second ballot"
            problems.append(f"a ballot from {identity}: {why}")
            continue
        seen.add(identity)
        fault = reader.check(_counted(entry), identity)
        recorded = entry.get(REJECTED_KEY)
        if recorded is None and fault is not None:
            problems.append(f"{identity}'s ballot counts but does not check: {fault}")
        elif recorded is not None and fault is None:
            problems.append(f"{identity}'s ballot checks but is recorded as rejected ({recorded})")
    return problems


def _counted(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return a stated ballot without its rejection mark (what the validator sent)."""
    return {key: value for key, value in entry.items() if key != REJECTED_KEY}


def _reader(statement: RoundStatement, domain: Eip712Domain | None) -> _Ballot:
    assert statement.plan is not None
    scored = {name: bytes.fromhex(h[2:]) for name, h in statement.plan.scored.items()}
    return _Ballot(statement.round, bytes.fromhex(statement.previous_hash[2:]), scored, domain)


def ballot_reports(
    statement: RoundStatement, domain: Eip712Domain | None
) -> tuple[ValidatorReport, ...]:
    """Return one report per drawn validator, from its ballot (see the module docstring)."""
    by_validator: dict[str, list[Mapping[str, Any]]] = {}
    for entry in statement.ballots:
        by_validator.setdefault(str(entry.get("validator")), []).append(entry)
    node_of = statement.node_of()
    reader = _reader(statement, domain)
    reports = []
    for identity in statement.validators:
        baseline, losses, problem = reader.read(by_validator.get(identity, []), identity)
        reports.append(
            ValidatorReport(
                validator=node_of.get(identity, identity),
                baseline_loss=baseline,
                candidate_losses=losses,
                problems=() if problem is None else (problem,),
            )
        )
    return tuple(reports)


@dataclass(frozen=True)
class _Ballot:
    """How one round reads a validator's ballot entries."""

    round: int
    previous: bytes
    scored: Mapping[str, bytes]
    domain: Eip712Domain | None

    def read(
        self, entries: Sequence[Mapping[str, Any]], identity: str
    ) -> tuple[float, dict[str, float], str | None]:
        """Return the baseline loss, the losses by model name, and why they do not count."""
        nothing = math.nan, dict.fromkeys(self.scored, math.nan)
        if len(entries) != 1:
            return *nothing, "no ballot" if not entries else f"{len(entries)} ballots, not one"
        entry = entries[0]
        if REJECTED_KEY in entry:
            return *nothing, f"rejected when the round ran: {entry[REJECTED_KEY]}"
        return self._read_one(entry, identity)

    def check(self, entry: Mapping[str, Any], identity: str) -> str | None:
        """Return why one ballot does not count (None if it checks)."""
        return self._read_one(entry, identity)[2]

    def _read_one(
        self, entry: Mapping[str, Any], identity: str
    ) -> tuple[float, dict[str, float], str | None]:
        nothing = math.nan, dict.fromkeys(self.scored, math.nan)
        if not entry.get("signature"):
            if identity.startswith(UNSIGNED_PREFIX):
                return self._unsigned(entry)
            return *nothing, f"{identity} signs its replies, but its ballot is unsigned"
        if self.domain is None:
            return *nothing, "a signed ballot, but no audit trail to check it against"
        try:
            signed = SignedBallot.from_fields(entry)
        except ValueError as err:
            return *nothing, f"malformed ballot: {err}"
        fault = ballot_fault(signed, self.domain, self.round, self.previous, identity)
        if fault is not None:
            return *nothing, f"ballot rejected: {fault}"
        losses = signed.ballot.loss_of()
        return (
            losses.get(self.previous, math.nan),
            {name: losses.get(digest, math.nan) for name, digest in self.scored.items()},
            None,
        )

    def _unsigned(self, entry: Mapping[str, Any]) -> tuple[float, dict[str, float], str | None]:
        try:
            bits = {str(k): loss_from_bits(int(v)) for k, v in entry["loss_bits"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
            return math.nan, dict.fromkeys(self.scored, math.nan), f"malformed ballot: {err!r}"
        losses = {name: bits.get(name, math.nan) for name in self.scored}
        return bits.get(BASELINE_CANDIDATE, math.nan), losses, None


def unsigned_ballot(identity: str, report: ValidatorReport) -> dict[str, Any]:
    """Return the statement's entry for a validator that cannot sign: its plain losses."""
    losses = {BASELINE_CANDIDATE: report.baseline_loss, **report.candidate_losses}
    return {"validator": identity, "loss_bits": {k: loss_bits(v) for k, v in losses.items()}}
