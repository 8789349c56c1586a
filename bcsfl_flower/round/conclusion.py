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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def ballot_reports(
    statement: RoundStatement, domain: Eip712Domain | None
) -> tuple[ValidatorReport, ...]:
    """Return one report per drawn validator, from its ballot (see the module docstring)."""
    assert statement.plan is not None
    scored = {name: bytes.fromhex(h[2:]) for name, h in statement.plan.scored.items()}
    previous = bytes.fromhex(statement.previous_hash[2:])
    by_validator: dict[str, list[Mapping[str, Any]]] = {}
    for entry in statement.ballots:
        by_validator.setdefault(str(entry.get("validator")), []).append(entry)
    node_of = statement.node_of()
    reader = _Ballot(statement.round, previous, scored, domain)
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
