"""The noise reference: validators tolerate what noise of the candidate's size costs them."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from bcsfl_flower.round.noise_reference import (
    NOISE_REFERENCE,
    noise_allowance,
    reference_norm,
    reference_rng,
)
from bcsfl_flower.round.plain import PlainSpace
from bcsfl_flower.round.selection import TrustedMeanSelection
from bcsfl_flower.round.state import CandidatePlan, ValidatorReport

TOLERANCE = 0.05
VALIDATORS = ["v1", "v2", "v3", "v4", "v5"]


def report(validator, baseline, mean, reference=None):
    losses = {"trusted-mean": mean}
    if reference is not None:
        losses[NOISE_REFERENCE] = reference
    return ValidatorReport(validator, baseline, losses)


def decide(reports):
    plan = CandidatePlan(("trusted-mean",), np.ones((1, 3)) / 3, ((0, 1, 2),))
    return TrustedMeanSelection().decide(plan, reports, VALIDATORS, TOLERANCE)


def test_the_reference_norm_is_the_candidates_norm_if_no_two_updates_aligned():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4, 20_000))  # independent, like DP noise
    coefficients = np.array([0.1, 0.2, 0.3, 0.4])
    gram = noise @ noise.T
    expected = np.linalg.norm(coefficients @ noise)
    assert reference_norm(gram, coefficients) == pytest.approx(expected, rel=0.02)
    aligned = np.ones((4, 4))  # four equal unit updates: the mean is 1 long, not 0.55
    assert reference_norm(aligned, np.full(4, 0.25)) == pytest.approx(0.5)


def test_the_reference_is_w_t_moved_by_exactly_that_length_and_replays_the_same():
    arrays = ArrayRecord({"w": Array(np.zeros((30, 20), np.float32)), "b": Array(np.ones(7))})
    first = PlainSpace().shifted(arrays, 2.5, reference_rng(b"\x01" * 32, 3))
    again = PlainSpace().shifted(arrays, 2.5, reference_rng(b"\x01" * 32, 3))
    other = PlainSpace().shifted(arrays, 2.5, reference_rng(b"\x01" * 32, 4))
    step = np.concatenate([first["w"].numpy().ravel(), first["b"].numpy().ravel() - 1])
    assert np.linalg.norm(step) == pytest.approx(2.5, rel=1e-5)
    assert first["b"].numpy().dtype == np.float64 and first["w"].numpy().shape == (30, 20)
    assert np.array_equal(first["w"].numpy(), again["w"].numpy())
    assert not np.array_equal(first["w"].numpy(), other["w"].numpy())


def test_the_allowance_is_what_the_reference_raised_the_loss_and_never_negative():
    assert noise_allowance(report("v", 1.0, 1.0, reference=1.3)) == pytest.approx(0.3)
    assert noise_allowance(report("v", 1.0, 1.0, reference=0.8)) == 0.0
    assert noise_allowance(report("v", 1.0, 1.0)) == 0.0
    for unusable in (math.nan, math.inf, -math.inf):
        assert noise_allowance(report("v", 1.0, 1.0, reference=unusable)) == 0.0


def test_a_noisy_honest_candidate_commits_once_validators_see_what_noise_costs():
    # Each validator's loss rises by about what pure noise of the same size raises it.
    noisy = [(1.0, 1.3, 1.35), (1.0, 1.2, 1.25), (1.0, 0.9, 1.0), (1.0, 1.1, 1.2), (1.0, 1.4, 1.3)]
    without = decide([report(f"v{i + 1}", b, m) for i, (b, m, _) in enumerate(noisy)])
    assert not without.committed
    judged = decide([report(f"v{i + 1}", b, m, r) for i, (b, m, r) in enumerate(noisy)])
    assert judged.committed and judged.candidate == "trusted-mean"
    assert judged.ballots["v1"]["trusted-mean"]["tolerance"] == pytest.approx(0.40)


def test_a_candidate_worse_than_noise_of_its_size_is_still_voted_down():
    # Poison that raises every loss by far more than the reference did.
    poisoned = [report(f"v{i + 1}", 1.0, 2.5, reference=1.3) for i in range(5)]
    decision = decide(poisoned)
    assert not decision.committed
    assert "no candidate reached quorum 4 of 5" in decision.reason


def test_a_validator_that_inflates_its_reference_loss_moves_only_its_own_vote():
    honest = [report(f"v{i + 1}", 1.0, 2.5, reference=1.1) for i in range(4)]
    liar = report("v5", 1.0, 2.5, reference=1e9)
    decision = decide([*honest, liar])
    assert not decision.committed and decision.votes_for == 1
