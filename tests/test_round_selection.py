"""Selection rules: candidates from the screened updates, decisions from the votes."""

import math

import numpy as np
import pytest

from bcsfl_flower.committee import quorum_size
from bcsfl_flower.round.bounds import bound_updates
from bcsfl_flower.round.consensus import accepts
from bcsfl_flower.round.screening import screen_updates
from bcsfl_flower.round.selection import (
    SELECTION_RULES,
    PaperSelection,
    TrustedMeanSelection,
    selection_rule,
)
from bcsfl_flower.round.settings import SettingError
from bcsfl_flower.round.state import CandidatePlan, ValidatorReport

TOLERANCE = 0.05


def report(validator, baseline, **losses):
    return ValidatorReport(validator, baseline, {k.replace("_", "-"): v for k, v in losses.items()})


def trusted_mean_plan(n_honest=7, n_attackers=3, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=50)
    updates = np.vstack(
        [direction + 0.3 * rng.normal(size=50) for _ in range(n_honest)]
        + [-direction + 0.3 * rng.normal(size=50) for _ in range(n_attackers)]
    )
    gram = updates @ updates.T
    bounds = bound_updates(
        np.sqrt(np.diag(gram)), np.full(len(updates), 10.0), np.ones(len(updates))
    )
    screening = screen_updates(gram, bounds)
    names = [str(i) for i in range(len(updates))]
    return TrustedMeanSelection().plan(gram, bounds, screening, names), bounds, screening


# ----- quorum and votes ------------------------------------------------------------------
@pytest.mark.parametrize(("n", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (6, 4), (7, 5)])
def test_quorum_is_the_ceiling_of_two_thirds(n, quorum):
    assert quorum_size(n) == quorum == math.ceil(2 * n / 3)


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_quorum_rejects_bad_sizes(n, error):
    with pytest.raises(error):
        quorum_size(n)


def test_accept_vote_boundary_and_abstention():
    assert accepts(-TOLERANCE, TOLERANCE) is True
    assert accepts(-TOLERANCE - 1e-9, TOLERANCE) is False
    assert accepts(math.nan, TOLERANCE) is None


# ----- trusted-mean ----------------------------------------------------------------------
def test_trusted_mean_plan_offers_the_mean_its_core_and_the_geometric_median():
    plan, bounds, screening = trusted_mean_plan()
    # The opposed group is set apart (as tight as the honest clients are with each other,
    # so not provably coordinated): the federation mean with it comes first.
    assert plan.names == (
        "federation-mean",
        "trusted-mean",
        "core-mean",
        "geometric-median",
        "trusted-half-step",
    )
    trusted = set(screening.trusted)
    assert trusted == set(range(7)) and screening.set_apart == (7, 8, 9)
    assert screening.committee_pool == tuple(range(10))  # the group can validate
    assert plan.supports[0] == tuple(range(10))
    for coefficients, support in zip(plan.coefficients[1:], plan.supports[1:], strict=True):
        assert set(np.flatnonzero(coefficients)) <= trusted and set(support) <= trusted
    np.testing.assert_allclose(plan.coefficients[1][:7], bounds.clip[:7] / 7)
    np.testing.assert_allclose(plan.coefficients[4], 0.5 * plan.coefficients[1])
    assert set(plan.fallback_suspects) == trusted - set(plan.supports[2])
    assert len(plan.supports[2]) >= 4  # the core holds at least half


def test_a_coordinated_group_is_rejected_outright_and_gets_no_federation_candidate():
    rng = np.random.default_rng(5)
    honest = rng.normal(size=(14, 50))  # heterogeneous honest clients, no common group
    attack = np.tile(-honest.mean(axis=0) * 3, (6, 1))  # byzfl-style: one vector for all
    updates = np.vstack([honest, attack])
    gram = updates @ updates.T
    bounds = bound_updates(np.sqrt(np.diag(gram)), np.full(20, 10.0), np.ones(20))
    screening = screen_updates(gram, bounds)
    assert set(screening.rejected) == set(range(14, 20)) and screening.set_apart == ()
    assert screening.committee_pool == tuple(range(14))  # a coordinated group never validates
    assert all("coordinated group" in screening.reasons[i] for i in range(14, 20))
    plan = TrustedMeanSelection().plan(gram, bounds, screening, [str(i) for i in range(20)])
    assert "federation-mean" not in plan.names


def test_a_set_apart_group_is_kept_unless_the_federation_mean_costs_the_validators():
    plan, _, _ = trusted_mean_plan()
    rule, validators = TrustedMeanSelection(), ["v1", "v2", "v3", "v4", "v5"]

    def reports(federation, trusted, fallback):
        return [
            report(
                v,
                1.0,
                federation_mean=federation,
                trusted_mean=trusted,
                core_mean=fallback,
                geometric_median=fallback,
            )
            for v in validators
        ]

    # within 15% of the trusted mean's gain: the group is kept, even though a fallback
    # scores higher (the fallbacks answer another question)
    kept = rule.decide(plan, reports(0.91, 0.90, 0.5), validators, TOLERANCE)
    assert kept.candidate == "federation-mean" and set(kept.support) == set(range(10))
    # the federation mean loses 40% of the gain: the group is left out
    left_out = rule.decide(plan, reports(0.94, 0.90, 0.95), validators, TOLERANCE)
    assert left_out.candidate == "trusted-mean" and set(left_out.support) == set(range(7))


def test_when_the_full_step_overshoots_for_too_many_validators_the_half_step_commits():
    """Late in training on skewed data the mean step raises some honest validators' loss."""
    plan, _, _ = trusted_mean_plan(n_attackers=0)
    assert plan.names == ("trusted-mean", "core-mean", "geometric-median", "trusted-half-step")
    validators = ["v1", "v2", "v3", "v4", "v5"]
    losses = {  # v4 and v5 lose 0.08 from every full step, 0.02 from the half step
        v: dict(trusted_mean=1.08, core_mean=1.08, geometric_median=1.08, trusted_half_step=1.02)
        if v in ("v4", "v5")
        else dict(trusted_mean=0.9, core_mean=0.92, geometric_median=0.92, trusted_half_step=0.95)
        for v in validators
    }
    reports = [report(v, 1.0, **losses[v]) for v in validators]
    decision = TrustedMeanSelection().decide(plan, reports, validators, TOLERANCE)
    assert decision.committed and decision.candidate == "trusted-half-step"
    assert decision.votes_for == 5


def test_set_apart_validators_cannot_veto_the_candidates_that_leave_them_out():
    plan, _, _ = trusted_mean_plan()
    assert plan.parties == ("7", "8", "9")
    rule, validators = TrustedMeanSelection(), ["1", "8", "2", "9", "3"]
    # Two of the set-apart group sit on the committee and reject everything that leaves
    # them out (their loss rises); the three others accept the trusted side's models
    # and find the federation mean 40% worse.
    reports = [
        report(v, 1.0, federation_mean=1.5, trusted_mean=1.5, core_mean=1.5, geometric_median=1.5)
        if v in ("8", "9")
        else report(
            v, 1.0, federation_mean=0.94, trusted_mean=0.9, core_mean=0.95, geometric_median=0.95
        )
        for v in validators
    ]
    decision = rule.decide(plan, reports, validators, TOLERANCE)
    assert decision.committed and decision.candidate == "trusted-mean"
    assert decision.votes_for == 3 and decision.quorum == 2  # 2 of the 3 other validators
    assert "federation-mean 3, trusted-mean 3 of 3" in decision.reason
    # They do vote on the federation mean: with them it needs 4 of 5, and has 3.
    assert decision.ballots["8"]["federation-mean"]["accept"] is False


def test_the_best_candidate_that_reaches_the_quorum_commits():
    plan = CandidatePlan(("a", "b", "c"), np.eye(3), ((0,), (1,), (2,)), (2,))
    validators = ["v1", "v2", "v3", "v4", "v5"]
    # a: 5 accepts, median delta 0.1; b: 4 accepts, median delta 0.3; c: 3 accepts.
    reports = [
        report("v1", 1.0, a=0.9, b=0.7, c=0.5),
        report("v2", 1.0, a=0.9, b=0.7, c=0.5),
        report("v3", 1.0, a=0.9, b=0.7, c=0.5),
        report("v4", 1.0, a=0.9, b=1.5, c=1.5),
        report("v5", 1.0, a=0.9, b=0.7, c=1.5),
    ]
    decision = TrustedMeanSelection().decide(plan, reports, validators, TOLERANCE)
    assert decision.committed and decision.candidate == "b"
    assert decision.votes_for == 4 and decision.quorum == 4 and decision.support == (1,)
    assert decision.ballots["v4"]["b"] == {
        "accept": False,
        "delta": pytest.approx(-0.5),
        "tolerance": TOLERANCE,
    }


def test_a_trusted_mean_that_reaches_the_quorum_commits_over_higher_scoring_fallbacks():
    names = ("trusted-mean", "core-mean", "geometric-median")
    plan = CandidatePlan(names, np.eye(3), ((0, 1, 2), (0, 1), (0, 1, 2)))
    validators = ["v1", "v2", "v3", "v4", "v5"]
    # The core fits the majority's classes: it lowers their loss five times as much.
    losses = {"trusted-mean": 0.98, "core-mean": 0.9, "geometric-median": 0.92}
    reports = [report(v, 1.0, **losses) for v in validators]
    decision = TrustedMeanSelection().decide(plan, reports, validators, TOLERANCE)
    assert decision.candidate == "trusted-mean" and decision.support == (0, 1, 2)
    # Voted down, the mean gives way to the best-scoring fallback.
    losses["trusted-mean"] = 1.5
    reports = [report(v, 1.0, **losses) for v in validators]
    decision = TrustedMeanSelection().decide(plan, reports, validators, TOLERANCE)
    assert decision.candidate == "core-mean"


def test_no_quorum_rolls_back_and_names_the_suspects():
    plan = CandidatePlan(("a", "b"), np.eye(2), ((0, 1), (0,)), (1,))
    reports = [report(f"v{i}", 1.0, a=2.0, b=2.0) for i in range(3)]
    reports += [report("v3", 1.0, a=0.5, b=0.5)]
    decision = TrustedMeanSelection().decide(plan, reports, ["v0", "v1", "v2", "v3", "v4"], 0.05)
    assert not decision.committed and decision.candidate is None
    assert decision.suspects == (1,) and decision.support == ()
    assert "no candidate reached quorum 4 of 5 validators" in decision.reason


def test_silent_and_failing_validators_count_against_the_quorum():
    plan = CandidatePlan(("a",), np.eye(1), ((0,),))
    reports = [report("v1", 1.0, a=0.5), report("v2", 1.0, a=0.5), report("v3", 1.0, a=0.5)]
    reports.append(ValidatorReport("v4", math.nan, {"a": math.nan}, ("error reply",)))
    decision = TrustedMeanSelection().decide(plan, reports, ["v1", "v2", "v3", "v4", "v5"], 0.05)
    assert not decision.committed and decision.votes_for == 3 and decision.quorum == 4


def test_a_contested_round_offers_the_bounded_mean_of_both_groups_alone():
    plan, bounds, screening = trusted_mean_plan(n_honest=5, n_attackers=5)
    assert screening.contested and screening.trusted == tuple(range(10))
    assert plan.contested and plan.names == ("federation-mean",)
    # Every update clipped to the median norm and equally weighted: neither group's core,
    # median or mean alone is offered, so a committee drawn from one side cannot pick it.
    np.testing.assert_allclose(plan.coefficients[0], bounds.clip / 10)
    assert bounds.clip.min() < 1.0
    assert plan.supports == (tuple(range(10)),) and plan.fallback_suspects == ()


def test_a_contested_round_commits_its_candidate_without_the_quorum_and_says_so():
    plan = CandidatePlan(("federation-mean",), np.ones((1, 4)), ((0, 1, 2, 3),), contested=True)
    split = [report(f"v{i}", 1.0, federation_mean=0.5 if i < 3 else 2.0) for i in range(5)]
    decision = TrustedMeanSelection().decide(plan, split, [f"v{i}" for i in range(5)], TOLERANCE)
    assert decision.committed and decision.candidate == "federation-mean"
    assert decision.votes_for == 3 and decision.quorum == 4 and decision.support == (0, 1, 2, 3)
    assert decision.reason.startswith("commit (contested)")
    assert decision.ballots["v4"]["federation-mean"]["accept"] is False
    # The same votes roll an uncontested round back.
    uncontested = CandidatePlan(("federation-mean",), np.ones((1, 4)), ((0, 1, 2, 3),))
    assert (
        not TrustedMeanSelection()
        .decide(uncontested, split, ["v0", "v1", "v2", "v3", "v4"], TOLERANCE)
        .committed
    )


def test_no_validator_rolls_back():
    plan = CandidatePlan(("a",), np.eye(1), ((0,),), (0,))
    decision = TrustedMeanSelection().decide(plan, [], [], 0.05)
    assert not decision.committed and decision.suspects == (0,)
    assert "no validators" in decision.reason


# ----- paper -----------------------------------------------------------------------------
def paper_plan(n=4):
    names = [str(10 + i) for i in range(n)]
    updates = np.eye(n)
    gram = updates @ updates.T
    bounds = bound_updates(np.ones(n), np.ones(n), np.ones(n))
    screening = screen_updates(gram, bounds)
    return PaperSelection().plan(gram, bounds, screening, names)


def test_paper_plan_offers_each_trusted_local_model_with_the_mean_steps_length():
    plan = paper_plan()
    assert plan.names == ("client-10", "client-11", "client-12", "client-13")
    # Four orthogonal unit updates: their mean is 1/2 long, so each step is halved.
    np.testing.assert_allclose(plan.coefficients, 0.5 * np.eye(4))
    assert plan.supports == ((0,), (1,), (2,), (3,))


def test_the_primarys_proposal_commits_with_a_quorum_of_accepts():
    plan = paper_plan()
    # Each validator prefers a different model, but all accept client-11 (delta >= -0.05).
    reports = [
        report("v1", 1.0, client_10=0.95, client_11=0.8, client_12=1.0, client_13=1.0),
        report("v2", 1.0, client_10=0.9, client_11=1.02, client_12=0.5, client_13=1.0),
        report("v3", 1.0, client_10=0.9, client_11=1.0, client_12=0.9, client_13=0.1),
    ]
    decision = PaperSelection().decide(plan, reports, ["v1", "v2", "v3"], TOLERANCE)
    assert decision.committed and decision.candidate == "client-11"
    assert decision.votes_for == 3 and decision.support == (1,)
    assert decision.ballots["views"][0]["primary"] == "v1"


def test_a_rejected_proposal_triggers_a_view_change():
    plan = paper_plan()
    reports = [
        report("v1", 1.0, client_10=0.1, client_11=1.0, client_12=1.0, client_13=1.0),
        report("v2", 1.0, client_10=2.0, client_11=0.8, client_12=1.0, client_13=1.0),
        report("v3", 1.0, client_10=2.0, client_11=0.9, client_12=1.0, client_13=1.0),
    ]
    decision = PaperSelection().decide(plan, reports, ["v1", "v2", "v3"], TOLERANCE)
    assert decision.committed and decision.candidate == "client-11"
    assert [view["proposal"] for view in decision.ballots["views"]] == ["client-10", "client-11"]


def test_when_every_proposal_fails_the_proposers_are_suspects():
    plan = paper_plan(3)
    reports = [
        report("v1", 1.0, client_10=0.1, client_11=2.0, client_12=2.0),
        report("v2", 1.0, client_10=2.0, client_11=0.1, client_12=2.0),
        report("v3", 1.0, client_10=2.0, client_11=2.0, client_12=0.1),
    ]
    decision = PaperSelection().decide(plan, reports, ["v1", "v2", "v3", "silent"], TOLERANCE)
    assert not decision.committed
    assert sorted(decision.suspects) == [0, 1, 2]
    assert decision.ballots["views"][-1] == {"primary": "silent", "proposal": None}


# ----- registry --------------------------------------------------------------------------
def test_rules_come_from_a_registry_and_paper_is_refused_with_ckks():
    assert set(SELECTION_RULES) == {"trusted-mean", "paper"}
    assert isinstance(selection_rule("paper"), PaperSelection)
    with pytest.raises(SettingError, match="selection must be one of"):
        selection_rule("best")
    with pytest.raises(SettingError, match="cannot run with CKKS"):
        selection_rule("paper", encrypted=True)
    assert isinstance(selection_rule("trusted-mean", encrypted=True), TrustedMeanSelection)


def test_near_ties_go_to_the_preferred_candidate():
    plan = CandidatePlan(("mean", "median"), np.eye(2), ((0, 1), (0,)))
    validators = ["v1", "v2", "v3"]

    def decide(median_loss):
        reports = [report(v, 1.0, mean=0.9, median=median_loss) for v in validators]
        return TrustedMeanSelection().decide(plan, reports, validators, TOLERANCE).candidate

    assert decide(0.895) == "mean"  # 0.005 better: within the tie margin
    assert decide(0.85) == "median"  # 0.05 better: a real difference


def test_a_primary_does_not_propose_its_own_model():
    plan = paper_plan(3)
    reports = [
        report("10", 1.0, client_10=0.1, client_11=0.5, client_12=0.9),
        report("11", 1.0, client_10=0.9, client_11=0.2, client_12=0.9),
        report("12", 1.0, client_10=0.9, client_11=0.9, client_12=0.3),
    ]
    decision = PaperSelection().decide(plan, reports, ["10", "11", "12"], TOLERANCE)
    assert decision.ballots["views"][0]["proposal"] == "client-11"
    assert decision.committed and decision.candidate == "client-11"


def test_a_contested_round_commits_both_groups_without_quorum_the_set_apart_one_with_it():
    rule, validators = TrustedMeanSelection(), ["v1", "v2", "v3", "v4", "v5"]
    plan = CandidatePlan(
        ("federation-mean", "trusted-mean"), np.eye(2), ((0, 1), (0,)), contested=True
    )
    split = [report(v, 1.0, federation_mean=1.2, trusted_mean=1.2) for v in validators[:3]]
    split += [report(v, 1.0, federation_mean=0.8, trusted_mean=0.8) for v in validators[3:]]
    below = rule.decide(plan, split, validators, TOLERANCE)
    assert below.committed and below.candidate == "trusted-mean" and below.support == (0,)
    assert below.reason.startswith("commit (contested)")
    # a quorum for the federation with the set-apart group carries it even when the
    # two contested groups' mean has none
    backed = [report(v, 1.0, federation_mean=0.5, trusted_mean=1.2) for v in validators[:3]]
    backed += [report(v, 1.0, federation_mean=0.5, trusted_mean=0.8) for v in validators[3:]]
    assert rule.decide(plan, backed, validators, TOLERANCE).candidate == "federation-mean"
    agreed = [report(v, 1.0, federation_mean=0.85, trusted_mean=0.9) for v in validators]
    kept = rule.decide(plan, agreed, validators, TOLERANCE)
    assert kept.candidate == "federation-mean" and kept.support == (0, 1)


@pytest.mark.parametrize("n_attackers", [0, 3])
def test_the_leading_candidates_decide_alone_whenever_one_of_them_commits(n_attackers):
    """What lets a plain validator score two models, not five: over random ballots, a
    decision from the leading candidates' scores alone that commits one of them is the
    decision all the scores give."""
    plan, _, _ = trusted_mean_plan(n_attackers=n_attackers)
    rule, rng = TrustedMeanSelection(), np.random.default_rng(7)
    leading = rule.leading(plan)
    assert leading == plan.names[: plan.names.index("trusted-mean") + 1]
    assert ("federation-mean" in leading) == (n_attackers > 0)
    validators = [f"v{i}" for i in range(6)]
    outcomes = {"leading commits": 0, "fallbacks needed": 0}
    for _ in range(400):
        losses = {
            v: dict(zip(plan.names, rng.uniform(0.9, 1.12, len(plan.names)), strict=True))
            for v in validators
        }
        full = [ValidatorReport(v, 1.0, losses[v]) for v in validators]
        partial = [ValidatorReport(v, 1.0, {n: losses[v][n] for n in leading}) for v in validators]
        first = rule.decide(plan, partial, validators, TOLERANCE)
        if first.committed and first.candidate in leading:
            outcomes["leading commits"] += 1
            decision = rule.decide(plan, full, validators, TOLERANCE)
            assert (decision.candidate, decision.support) == (first.candidate, first.support)
        else:
            outcomes["fallbacks needed"] += 1
    assert min(outcomes.values()) > 20  # both branches were exercised


def test_a_rule_whose_decision_weighs_every_candidate_leads_with_all_of_them():
    plan = CandidatePlan(("1", "2"), np.eye(2), ((0,), (1,)), owners=("1", "2"))
    assert PaperSelection().leading(plan) == ("1", "2")
    contested = CandidatePlan(("federation-mean",), np.ones((1, 2)), ((0, 1),), contested=True)
    assert TrustedMeanSelection().leading(contested) == ("federation-mean",)
