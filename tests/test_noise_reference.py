"""The noise reference: validators tolerate what the trusted mean's sampling error costs them."""

import math

import numpy as np
import pytest

from bcsfl_flower.round.noise_reference import (
    NOISE_REFERENCES,
    noise_allowance,
    reference_rng,
    sampling_error_coefficients,
)
from bcsfl_flower.round.selection import TrustedMeanSelection
from bcsfl_flower.round.state import CandidatePlan, ValidatorReport

TOLERANCE = 0.05
VALIDATORS = ["v1", "v2", "v3", "v4", "v5"]
PLUS, MINUS = NOISE_REFERENCES


def report(validator, baseline, mean, plus=None, minus=None):
    losses = {"trusted-mean": mean}
    for name, loss in ((PLUS, plus), (MINUS, minus)):
        if loss is not None:
            losses[name] = loss
    return ValidatorReport(validator, baseline, losses)


def decide(reports):
    plan = CandidatePlan(("trusted-mean",), np.ones((1, 3)) / 3, ((0, 1, 2),))
    return TrustedMeanSelection().decide(plan, reports, VALIDATORS, TOLERANCE)


def test_the_sampling_error_is_half_the_difference_of_two_random_halves():
    weights, clip = np.ones(6), np.ones(6)
    error = sampling_error_coefficients((0, 1, 2, 3), weights, clip, reference_rng(b"h", 1))
    assert sorted(error[:4]) == pytest.approx([-0.25, -0.25, 0.25, 0.25])
    assert error[4:].tolist() == [0.0, 0.0]  # rejected clients take no part
    again = sampling_error_coefficients((0, 1, 2, 3), weights, clip, reference_rng(b"h", 1))
    np.testing.assert_array_equal(error, again)  # a replay draws the same split
    assert not sampling_error_coefficients((0,), weights, clip, reference_rng(b"h", 1)).any()


def test_the_sampling_error_has_the_trusted_means_variance():
    # Independent unit-variance updates: the mean of n has variance 1/n per coordinate.
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(20, 50_000))
    error = sampling_error_coefficients(range(20), np.ones(20), np.ones(20), rng) @ updates
    assert np.var(error) == pytest.approx(1 / 20, rel=0.05)


def test_the_allowance_is_the_larger_loss_increase_of_the_two_references():
    assert noise_allowance(report("v", 1.0, 1.0, plus=1.3, minus=1.1)) == pytest.approx(0.3)
    assert noise_allowance(report("v", 1.0, 1.0, plus=0.8, minus=1.2)) == pytest.approx(0.2)
    assert noise_allowance(report("v", 1.0, 1.0, plus=0.8, minus=0.9)) == 0.0
    assert noise_allowance(report("v", 1.0, 1.0)) == 0.0
    for unusable in (math.nan, math.inf, -math.inf):
        assert noise_allowance(report("v", 1.0, 1.0, unusable, unusable)) == 0.0


def test_a_noisy_honest_candidate_commits_once_validators_see_what_sampling_costs():
    # Each validator's loss rises by about what the sampling error alone raises it.
    rows = [(1.3, 1.35), (1.2, 1.25), (0.9, 1.0), (1.1, 1.2), (1.4, 1.3)]
    without = decide([report(f"v{i + 1}", 1.0, mean) for i, (mean, _) in enumerate(rows)])
    assert not without.committed
    judged = decide(
        [report(f"v{i + 1}", 1.0, mean, ref, 0.9) for i, (mean, ref) in enumerate(rows)]
    )
    assert judged.committed and judged.candidate == "trusted-mean"
    assert judged.ballots["v1"]["trusted-mean"]["tolerance"] == pytest.approx(0.40)


def test_a_candidate_worse_than_its_sampling_error_is_still_voted_down():
    poisoned = [report(f"v{i + 1}", 1.0, 2.5, plus=1.3, minus=1.2) for i in range(5)]
    decision = decide(poisoned)
    assert not decision.committed
    assert "no candidate reached quorum 4 of 5" in decision.reason


def test_a_validator_that_inflates_its_reference_loss_moves_only_its_own_vote():
    honest = [report(f"v{i + 1}", 1.0, 2.5, plus=1.1, minus=1.1) for i in range(4)]
    liar = report("v5", 1.0, 2.5, plus=1e9, minus=1.0)
    decision = decide([*honest, liar])
    assert not decision.committed and decision.votes_for == 1


def test_a_fallback_leading_by_less_than_the_sampling_error_does_not_beat_the_preferred_one():
    names = ("trusted-mean", "core-mean", "geometric-median")
    plan = CandidatePlan(names, np.eye(3), ((0, 1), (0,), (0, 1)))

    def reports(plus):
        losses = {"trusted-mean": 2.5, "core-mean": 0.7, "geometric-median": 0.5, PLUS: plus}
        return [ValidatorReport(v, 1.0, losses) for v in VALIDATORS]

    rule = TrustedMeanSelection()
    # The mean is voted down; the median leads the core by 0.2.
    assert rule.decide(plan, reports(1.0), VALIDATORS, TOLERANCE).candidate == "geometric-median"
    # A sampling error of 0.3 makes that lead chance: the core, preferred, commits.
    assert rule.decide(plan, reports(1.3), VALIDATORS, TOLERANCE).candidate == "core-mean"


def test_a_candidate_that_doubles_the_median_loss_never_commits_whatever_the_allowance():
    # The app's batch-32 DP on 4 clients: noise swamps everything, every validator accepts.
    swamped = [report(f"v{i + 1}", 2.3, 5.2, plus=9.0, minus=8.0) for i in range(5)]
    decision = decide(swamped)
    assert not decision.committed
    assert "more than 2x the validators' median loss: trusted-mean" in decision.reason
    assert decision.ballots["v1"]["trusted-mean"]["accept"] is True  # the votes were there
    # Below the bound the same allowance commits.
    assert decide([report(f"v{i + 1}", 2.3, 4.5, 9.0, 8.0) for i in range(5)]).committed


def test_without_noise_references_tiny_losses_may_double_within_the_tolerance():
    # A converged model: losses of 0.02 rising to 0.05 are within the 0.05 tolerance.
    converged = [report(f"v{i + 1}", 0.02, 0.05) for i in range(5)]
    assert decide(converged).committed
