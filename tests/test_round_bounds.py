"""Bounds: stake-weighted medians cap how far and how heavily one reply can pull."""

import numpy as np
import pytest

from bcsfl_flower.round.bounds import EXAMPLE_CAP_RATIO, bound_updates, weighted_median


def test_weighted_median_with_equal_weights_is_the_lower_median():
    assert weighted_median(np.array([5.0, 1.0, 3.0]), np.ones(3)) == 3.0
    assert weighted_median(np.array([4.0, 1.0, 3.0, 2.0]), np.ones(4)) == 2.0


def test_a_group_with_less_than_half_the_weight_cannot_move_the_median():
    values = np.array([1.0, 1.1, 0.9, 1e6, 1e9])
    assert weighted_median(values, np.array([1, 1, 1, 1, 1.0])) == 1.1
    # Attackers with a third of the weight cannot reach the median, even as half the count.
    values = np.array([1.0, 1.2, 1e6, 1e9])
    assert weighted_median(values, np.array([1.0, 1.0, 0.5, 0.5])) == 1.2


def test_weighted_median_edge_cases():
    assert weighted_median(np.array([2.0, 8.0]), np.zeros(2)) == 2.0  # zero weight: equal
    with pytest.raises(ValueError, match="no values"):
        weighted_median(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_median(np.array([1.0]), np.ones(2))


def test_updates_longer_than_the_median_norm_are_clipped_to_it():
    norms = np.array([1.0, 2.0, 3.0, 4.0, 3e6])
    bounds = bound_updates(norms, np.full(5, 10.0), np.ones(5))
    assert bounds.norm_bound == 3.0
    np.testing.assert_allclose(norms * bounds.clip, [1.0, 2.0, 3.0, 3.0, 3.0])
    clipped = bounds.clipped_gram(np.diag(norms**2))
    np.testing.assert_allclose(np.sqrt(np.diag(clipped)), [1.0, 2.0, 3.0, 3.0, 3.0])


def test_huge_example_counts_are_capped_and_stake_scales_weights():
    counts = np.array([100.0, 200.0, 300.0, 1e300])
    bounds = bound_updates(np.ones(4), counts, np.array([1.0, 1.0, 0.5, 1.0]))
    cap = EXAMPLE_CAP_RATIO * 200.0
    assert bounds.example_cap == cap
    # 300 examples at half stake; 1e300 examples credited as the cap
    np.testing.assert_allclose(bounds.weights, [100.0, 200.0, min(300.0, cap) * 0.5, cap])
    assert bounds.weights[-1] / bounds.weights.sum() < 0.5


def test_zero_updates_and_no_updates():
    bounds = bound_updates(np.zeros(3), np.ones(3), np.ones(3))
    assert bounds.norm_bound == 0.0 and np.all(bounds.clip == 1.0)
    empty = bound_updates(np.zeros(0), np.zeros(0), np.zeros(0))
    assert empty.norms.size == 0
