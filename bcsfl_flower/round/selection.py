"""Selection rules: which candidates the validators score and how their votes decide.

A rule has two halves, one on each side of the validation exchange:
:meth:`SelectionRule.plan` turns the screened updates into candidates, and
:meth:`SelectionRule.decide` turns the validators' loss deltas into a
:class:`~bcsfl_flower.round.state.Decision`. Rules are chosen by name from
:data:`SELECTION_RULES`, the way Opacus maps mechanism names to accountants.

``trusted-mean`` (the default)
    Four candidates, in order of preference: the trusted cluster's mean, the mean of
    its core, its geometric median, and the trusted mean's half step (its direction at
    :data:`HALF_STEP` of its length). Each validator accepts a candidate that does not
    raise its loss by more than the tolerance. The trusted mean commits when it reaches
    the 2/3 quorum; otherwise, among the fallbacks that reach it, the one with the
    highest median loss delta (within :data:`TIE_MARGIN`, or the validators' median
    noise allowance when larger, the preferred one: a lead within the sampling error
    is chance). When poison slips into the trusted cluster, the mean is voted down but
    its robust fallbacks still carry the round, so a round does not stall while a safe
    step exists. A contested round (no side holds the qualified stake share) commits
    the bounded mean of both sides, quorum or not.

``paper``
    BCS-FL's own selection as a PBFT step: every trusted local model is a candidate,
    the primary (the first validator drawn) proposes the one, other than its own, that
    lowers its loss most, and the committee accepts or rejects that proposal;
    ``ceil(2M/3)`` accepts commit it. A rejected proposal triggers a view change to the
    next validator in draw order, as PBFT changes primary. All of this uses the losses
    of one exchange.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from bcsfl_flower.committee import quorum_size
from bcsfl_flower.round.candidates import core_rows, geometric_median_weights, mean_coefficients
from bcsfl_flower.round.consensus import (
    MAX_LOSS_GROWTH,
    accept_votes,
    count_accepts,
    outgrows_baseline,
)
from bcsfl_flower.round.constraints import SettingError
from bcsfl_flower.round.noise_reference import noise_allowance
from bcsfl_flower.round.state import (
    Bounds,
    CandidatePlan,
    Decision,
    Screening,
    ValidatorReport,
)

TIE_MARGIN = 0.01
"""Median loss deltas within this of the best count as a tie, won by the preferred candidate.

All candidates are scored on the same validation data, so their differences are real
but often tiny once the model has converged; the trusted mean uses every trusted
client's data and is the candidate that generalises like FedAvg, so it should not lose
to a fallback by a thousandth of a loss unit."""


HALF_STEP = 0.5
"""Length of the last candidate, the trusted mean's shorter step, as a share of it.

Late in training on skewed data a full step that helps most clients raises some honest
validators' loss beyond the tolerance, and a round where two of five do so rolls back
although its direction is right. Half the step keeps the direction and roughly halves
the overshoot: those rounds commit it, and nothing changes where the full step reaches
the quorum (it scores higher). Measurements: ``docs/constants.md``."""

INCLUSION_SHARE = 0.15
"""Share of the trusted mean's loss gain a set-apart group may cost and still be kept.

See :meth:`TrustedMeanSelection._with_set_apart`. Label flippers cost the trusted
validators a larger share of their gain than honest groups with classes of their own
do; the share is set between the two, as measured on the tuning set
(``docs/constants.md``)."""


class SelectionRule(ABC):
    """How a round's candidates are built and decided."""

    name: ClassVar[str]
    shows_single_updates: ClassVar[bool] = False
    """Whether validators see individual clients' models (refused with CKKS)."""

    @abstractmethod
    def plan(
        self, gram: np.ndarray, bounds: Bounds, screening: Screening, names: Sequence[str]
    ) -> CandidatePlan:
        """Return the candidates for the validators."""

    @abstractmethod
    def decide(
        self,
        plan: CandidatePlan,
        reports: Sequence[ValidatorReport],
        validators: Sequence[str],
        tolerance: float,
    ) -> Decision:
        """Return the decision the validators' reports support."""

    def leading(self, plan: CandidatePlan) -> tuple[str, ...]:
        """Return the candidates whose scores can decide the round on their own.

        A validator that only answers ``evaluate`` messages (a plain ``ClientApp``)
        pays one evaluation per model, so it is first asked for these; the others are
        asked only if :meth:`decide` on these alone commits none of them. A rule whose
        every decision weighs all candidates returns them all (the default).
        """
        return plan.names


def no_validators(plan: CandidatePlan) -> Decision:
    """Return the decision of a round whose committee has no validator."""
    return Decision.rollback(
        "rollback: no validators in the committee", suspects=plan.fallback_suspects
    )


class TrustedMeanSelection(SelectionRule):
    """The trusted cluster's mean, with its core and geometric median as fallbacks.

    A *contested* round (the screen found two disagreeing groups and neither holds the
    qualified stake share) has one candidate, the federation mean: the bounded mean of
    both groups. The validators are drawn from both groups and split along the same
    line, so no 2/3 quorum can form, and a quorum that does form means the draw gave
    one side the committee: a vote decides nothing here. The federation mean commits
    with or without the quorum, and the decision says so. PBFT's guarantees need less
    than a third of the stake to be Byzantine; past that no vote is safe, and the
    bounded mean neither stalls nor lets either side take the model.
    """

    name = "trusted-mean"
    MEAN, CORE, MEDIAN = "trusted-mean", "core-mean", "geometric-median"
    HALF = "trusted-half-step"
    FEDERATION = "federation-mean"

    def plan(
        self, gram: np.ndarray, bounds: Bounds, screening: Screening, names: Sequence[str]
    ) -> CandidatePlan:
        """Return the mean, core mean and geometric median of the trusted cluster.

        When the direction test set a group apart, the federation mean (the bounded
        mean of the trusted cluster and that group) comes first: on skewed data a
        group of honest clients with their own classes looks as distinct as a
        coordinated attack, and only its effect on the validators' loss tells them
        apart. The validators are drawn from the trusted cluster and the set-apart
        group together (:attr:`~bcsfl_flower.round.state.Screening.committee_pool`), so
        the committee can hold the group's own classes; its median still belongs to
        the trusted side as long as it holds most of the stake. A contested
        round gets the bounded mean of both its groups (see the class docstring), last,
        after the federation mean with the set-apart group when there is one.
        """
        trusted = np.asarray(screening.trusted, dtype=np.int64)
        parties = tuple(names[row] for row in screening.set_apart)
        options: list[tuple[str, np.ndarray, np.ndarray]] = []
        if screening.set_apart:
            everyone = np.union1d(trusted, screening.set_apart)
            options.append(
                (
                    self.FEDERATION,
                    mean_coefficients(everyone, bounds.weights, bounds.clip),
                    everyone,
                )
            )
        if screening.contested:
            both = self.MEAN if screening.set_apart else self.FEDERATION
            options.append((both, mean_coefficients(trusted, bounds.weights, bounds.clip), trusted))
            return _plan(options, contested=True, parties=parties)
        inner = bounds.clipped_gram(gram)[np.ix_(trusted, trusted)]
        weights = bounds.weights[trusted]
        median = geometric_median_weights(inner, weights)
        core = trusted[core_rows(inner, median, weights)]
        median_coefficients = np.zeros(gram.shape[0])
        median_coefficients[trusted] = median * bounds.clip[trusted]
        mean = mean_coefficients(trusted, bounds.weights, bounds.clip)
        options += [
            (self.MEAN, mean, trusted),
            (self.CORE, mean_coefficients(core, bounds.weights, bounds.clip), core),
            (self.MEDIAN, median_coefficients, trusted),
            (self.HALF, HALF_STEP * mean, trusted),
        ]
        suspects = tuple(int(i) for i in np.setdiff1d(trusted, core)) if screening.split else ()
        return _plan(options, fallback_suspects=suspects, parties=parties)

    def decide(
        self,
        plan: CandidatePlan,
        reports: Sequence[ValidatorReport],
        validators: Sequence[str],
        tolerance: float,
    ) -> Decision:
        """Commit the most preferred candidate the quorum supports.

        The federation mean comes first unless the set-apart group costs the others
        too much (:meth:`_with_set_apart`), then the trusted mean, then the best
        scoring fallback (:meth:`_fallback`).

        A contested plan's candidate commits without the quorum (see the class
        docstring); its votes are still counted and recorded.
        """
        if not validators:
            return no_validators(plan)
        quorum = quorum_size(len(validators))
        votes = {name: accept_votes(reports, name, tolerance) for name in plan.names}
        seats = {name: self._seats(plan, name, validators) for name in plan.names}
        counts = {
            name: count_accepts({v: votes[name].get(v) for v in seats[name]}) for name in plan.names
        }
        quorums = {name: quorum_size(len(seats[name])) for name in plan.names}
        scores = {name: _median_delta(reports, name) for name in plan.names}
        ballots = _ballots(reports, plan.names, votes, tolerance)
        outgrown = [name for name in plan.names if outgrows_baseline(reports, name)]
        eligible = [
            name for name in plan.names if counts[name] >= quorums[name] and name not in outgrown
        ]
        tally = ", ".join(
            f"{name} {counts[name]}"
            + (f" of {len(seats[name])}" if len(seats[name]) < len(validators) else "")
            for name in plan.names
        )
        if outgrown:
            tally += f"; more than {MAX_LOSS_GROWTH:g}x the validators' median loss: " + ", ".join(
                outgrown
            )
        margin = max(TIE_MARGIN, float(np.median([noise_allowance(r) for r in reports])))
        chosen = self._with_set_apart(plan, eligible, scores, margin)
        if chosen is None and plan.contested and plan.names[-1] not in eligible:
            # Both groups' bounded mean commits, quorum or not.
            return _contested_commit(plan, counts[plan.names[-1]], quorum, len(validators), ballots)
        if not eligible:
            best = max(plan.names, key=lambda name: counts[name])
            return Decision.rollback(
                f"rollback: no candidate reached quorum {quorum} of {len(validators)} "
                f"validators (accept votes: {tally})",
                votes_for=counts[best],
                quorum=quorum,
                num_validators=len(validators),
                ballots=ballots,
                suspects=plan.fallback_suspects,
            )
        if chosen is None:
            chosen = self._fallback(eligible, scores, margin)
        return Decision.commit(
            chosen,
            plan.supports[plan.names.index(chosen)],
            votes_for=counts[chosen],
            quorum=quorums[chosen],
            num_validators=len(validators),
            reason=f"commit: {chosen!r} with {counts[chosen]}/{len(seats[chosen])} accept votes, "
            f"quorum {quorums[chosen]}, median loss delta {scores[chosen]:+.4f} "
            f"(accept votes: {tally})",
            ballots=ballots,
        )

    def leading(self, plan: CandidatePlan) -> tuple[str, ...]:
        """Return the federation mean (if any) and the trusted mean: the fallbacks wait.

        :meth:`decide` commits the federation mean or the trusted mean whenever either
        reaches the quorum, from their two scores alone (:meth:`_with_set_apart`,
        :meth:`_fallback`), so the fallbacks' scores can only matter when neither does.
        A contested plan's candidates are all leading.
        """
        if plan.contested or self.MEAN not in plan.names:
            return plan.names
        return plan.names[: plan.names.index(self.MEAN) + 1]

    def _fallback(self, eligible: list[str], scores: Mapping[str, float], margin: float) -> str:
        """Return the trusted mean if it reached the quorum, else the best-scoring fallback.

        The fallbacks (core mean, geometric median, half step) answer poison inside the
        trusted cluster, which shows as the mean missing the quorum. A fallback that
        merely scores higher is no evidence of poison on skewed data: the committee's
        median validator holds the majority's classes, and the core and the median fit
        those classes more closely than the mean does. Picking them by score costs the
        accuracy of the classes that only a few clients hold (``docs/constants.md``).
        """
        if self.MEAN in eligible:
            return self.MEAN
        eligible = [name for name in eligible if name != self.FEDERATION] or eligible
        best = max(scores[name] for name in eligible)
        return next(name for name in eligible if scores[name] >= best - margin)

    def _seats(self, plan: CandidatePlan, name: str, validators: Sequence[str]) -> list[str]:
        """Return the validators whose votes count towards ``name``'s quorum.

        A candidate that leaves the set-apart group out is decided by the other
        validators: the group's members are a party to that question, and with them
        on the committee a coordinated minority of them could block every round (seen
        in the end-to-end CNN federation: two label flippers on a committee of five
        rolled back a round the other three accepted). Every validator votes on the
        federation mean, and on everything when only parties were drawn.
        """
        if name == self.FEDERATION or not plan.parties:
            return list(validators)
        others = [v for v in validators if v not in plan.parties]
        return others or list(validators)

    def _with_set_apart(
        self, plan: CandidatePlan, eligible: list[str], scores: Mapping[str, float], margin: float
    ) -> str | None:
        """Return the federation mean if the set-apart group does not hurt, else None.

        The group's effect is the difference between the same bounded mean with and
        without it; the robust fallbacks answer another question (poison inside the
        trusted cluster) and do not take part. Most validators come from the trusted
        cluster, so on skewed data the mean fitted to their own classes looks a little
        better to them: the group is kept unless the federation mean falls short
        of the trusted mean's gain by more than :data:`INCLUSION_SHARE` of it (or the
        tie margin). If the trusted mean missed the quorum, an eligible federation mean
        is kept outright.
        """
        if self.FEDERATION not in eligible or self.MEAN not in plan.names:
            return None  # no set-apart group (a contested round's only candidate)
        if self.MEAN not in eligible:
            return self.FEDERATION
        reference = scores[self.MEAN]
        allowance = max(margin, INCLUSION_SHARE * abs(reference))
        return self.FEDERATION if scores[self.FEDERATION] >= reference - allowance else None


class PaperSelection(SelectionRule):
    """BCS-FL's single best local model, decided as a PBFT proposal with view changes.

    A primary never proposes its own model: on non-IID data every client's own model
    is the best on its own validation data, so self-proposals would split the vote.
    """

    name = "paper"
    shows_single_updates = True

    def plan(
        self, gram: np.ndarray, bounds: Bounds, screening: Screening, names: Sequence[str]
    ) -> CandidatePlan:
        """Return every trusted client's local model, its step bounded, as a candidate.

        A single client's step is bounded by the length of the step the trusted mean
        would take: on non-IID data one local model, moved its full length, raises
        every other validator's loss once the global model has converged, and no
        proposal could gather a quorum. The direction stays the client's own.
        """
        trusted = np.asarray(screening.trusted, dtype=np.int64)
        mean = mean_coefficients(trusted, bounds.weights, bounds.clip)
        mean_step = float(np.sqrt(max(mean @ gram @ mean, 0.0)))
        coefficients = np.zeros((len(trusted), gram.shape[0]))
        for position, row in enumerate(trusted):
            length = bounds.norms[row]
            coefficients[position, row] = min(bounds.clip[row], mean_step / length) if length else 0
        rows = list(trusted)
        return CandidatePlan(
            names=tuple(f"client-{names[row]}" for row in rows),
            coefficients=coefficients,
            supports=tuple((row,) for row in trusted),
            owners=tuple(names[row] for row in trusted),
        )

    def decide(
        self,
        plan: CandidatePlan,
        reports: Sequence[ValidatorReport],
        validators: Sequence[str],
        tolerance: float,
    ) -> Decision:
        """Let each validator in draw order propose until a proposal gathers the quorum."""
        if not validators:
            return no_validators(plan)
        quorum = quorum_size(len(validators))
        by_validator = {report.validator: report for report in reports}
        views: list[dict[str, Any]] = []
        for primary in validators:
            report = by_validator.get(primary)
            others = [n for n, o in zip(plan.names, plan.owners, strict=True) if o != primary]
            proposal = None if report is None else _best_candidate(report, others)
            if proposal is None:
                views.append({"primary": primary, "proposal": None})
                continue
            votes = accept_votes(reports, proposal, tolerance)
            count = count_accepts(votes)
            views.append({"primary": primary, "proposal": proposal, "votes": votes})
            if count >= quorum and not outgrows_baseline(reports, proposal):
                return Decision.commit(
                    proposal,
                    plan.supports[plan.names.index(proposal)],
                    votes_for=count,
                    quorum=quorum,
                    num_validators=len(validators),
                    reason=f"commit: {proposal!r} proposed by validator {primary} (view "
                    f"{len(views)}), {count}/{len(validators)} accept votes, quorum {quorum}",
                    ballots={"views": views},
                )
        rejected = {view["proposal"] for view in views if view["proposal"] is not None}
        suspects = tuple(
            row
            for name, support in zip(plan.names, plan.supports, strict=True)
            if name in rejected
            for row in support
        )
        return Decision.rollback(
            f"rollback: none of {len(views)} proposals reached quorum {quorum} of "
            f"{len(validators)} validators",
            quorum=quorum,
            num_validators=len(validators),
            ballots={"views": views},
            suspects=suspects,
        )


SELECTION_RULES: Mapping[str, type[SelectionRule]] = {
    rule.name: rule for rule in (TrustedMeanSelection, PaperSelection)
}
"""Selection rules by name (run config ``selection``)."""


def selection_rule(name: str, *, encrypted: bool = False) -> SelectionRule:
    """Return the selection rule called ``name``.

    Raises
    ------
    SettingError
        If no rule has that name, or it would show single clients' models to the
        validators of an encrypted (CKKS) federation.
    """
    if name not in SELECTION_RULES:
        raise SettingError("selection", f"must be one of {sorted(SELECTION_RULES)}, got {name!r}")
    rule = SELECTION_RULES[name]
    if encrypted and rule.shows_single_updates:
        raise SettingError(
            "selection",
            f"{name!r} cannot run with CKKS: validators would decrypt single clients' models",
        )
    return rule()


def _plan(
    options: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    contested: bool = False,
    fallback_suspects: tuple[int, ...] = (),
    parties: tuple[str, ...] = (),
) -> CandidatePlan:
    """Return the plan of ``(name, coefficients, support rows)`` options, duplicates dropped.

    A small cluster can make two candidates identical; the first of them is kept.
    """
    kept: list[tuple[str, np.ndarray, np.ndarray]] = []
    for option in options:
        if not any(np.allclose(option[1], other[1]) for other in kept):
            kept.append(option)
    return CandidatePlan(
        names=tuple(name for name, _, _ in kept),
        coefficients=np.stack([coefficients for _, coefficients, _ in kept]),
        supports=tuple(tuple(int(i) for i in rows) for _, _, rows in kept),
        fallback_suspects=fallback_suspects,
        contested=contested,
        parties=parties,
    )


def _contested_commit(
    plan: CandidatePlan,
    votes_for: int,
    quorum: int,
    num_validators: int,
    ballots: dict[str, Any],
) -> Decision:
    """Return the commit of a contested plan's last candidate (both groups' bounded mean).

    The plan's other candidate, if any, adds a group the screen set apart: that one
    needs the validators' quorum.
    """
    chosen = plan.names[-1]
    return Decision.commit(
        chosen,
        plan.supports[-1],
        votes_for=votes_for,
        quorum=quorum,
        num_validators=num_validators,
        reason=f"commit (contested): {chosen!r} with {votes_for}/{num_validators} accept votes, "
        f"below quorum {quorum}; the screen found two groups and neither holds the qualified "
        "stake share, so the committee splits as the federation does",
        ballots=ballots,
    )


def _median_delta(reports: Sequence[ValidatorReport], candidate: str) -> float:
    deltas = [report.delta(candidate) for report in reports]
    finite = [delta for delta in deltas if math.isfinite(delta)]
    return float(np.median(finite)) if finite else -math.inf


def _best_candidate(report: ValidatorReport, names: Sequence[str]) -> str | None:
    """Return the candidate that lowers this validator's loss most (ties: the first)."""
    deltas = [report.delta(name) for name in names]
    usable = [(delta, -index) for index, delta in enumerate(deltas) if math.isfinite(delta)]
    if not usable:
        return None
    return names[-max(usable)[1]]


def _ballots(
    reports: Sequence[ValidatorReport],
    names: Sequence[str],
    votes: Mapping[str, Mapping[str, bool | None]],
    tolerance: float,
) -> dict[str, dict[str, Any]]:
    """Return each validator's vote, loss delta and the tolerance it voted with."""
    return {
        report.validator: {
            name: {
                "accept": votes[name][report.validator],
                "delta": _finite(report.delta(name)),
                "tolerance": tolerance + noise_allowance(report),
            }
            for name in names
        }
        for report in reports
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
