"""Candidates from the Gram matrix: means, the geometric median and the cluster's core."""

import numpy as np
from scipy.optimize import minimize

from bcsfl_flower.round.candidates import (
    core_rows,
    geometric_median_weights,
    mean_coefficients,
    point_distances_squared,
)


def test_mean_coefficients_weight_the_clipped_rows():
    coefficients = mean_coefficients((0, 2), np.array([1.0, 5.0, 3.0]), np.array([0.5, 1.0, 1.0]))
    np.testing.assert_allclose(coefficients, [0.25 * 0.5, 0.0, 0.75])
    np.testing.assert_allclose(mean_coefficients((), np.ones(2), np.ones(2)), [0.0, 0.0])
    # All weights zero: an unweighted mean rather than nothing.
    np.testing.assert_allclose(mean_coefficients((0, 1), np.zeros(2), np.ones(2)), [0.5, 0.5])


def test_geometric_median_from_the_gram_matches_a_direct_minimisation():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(9, 30))
    weights = rng.uniform(0.5, 2.0, size=9)
    combination = geometric_median_weights(points @ points.T, weights)
    median = combination @ points
    assert np.isclose(combination.sum(), 1.0) and np.all(combination >= 0)

    def cost(x):
        return np.sum(weights * np.linalg.norm(points - x, axis=1))

    direct = minimize(cost, points.mean(axis=0), method="BFGS").x
    assert cost(median) <= cost(direct) + 1e-4 * cost(direct)


def test_geometric_median_ignores_a_far_minority():
    rng = np.random.default_rng(1)
    honest = rng.normal(loc=1.0, scale=0.1, size=(7, 20))
    poison = np.full((3, 20), -50.0)
    points = np.vstack([honest, poison])
    combination = geometric_median_weights(points @ points.T, np.ones(10))
    median = combination @ points
    assert np.linalg.norm(median - honest.mean(axis=0)) < 0.5
    assert np.linalg.norm(points.mean(axis=0) - honest.mean(axis=0)) > 10


def test_core_holds_at_least_half_the_weight_and_leaves_out_the_far_points():
    rng = np.random.default_rng(2)
    points = np.vstack([rng.normal(scale=0.1, size=(6, 10)), rng.normal(loc=5, size=(3, 10))])
    gram = points @ points.T
    weights = np.ones(9)
    median = geometric_median_weights(gram, weights)
    core = core_rows(gram, median, weights)
    assert set(core) <= set(range(6)) and len(core) >= 9 / 2
    distances = point_distances_squared(gram, median)
    np.testing.assert_allclose(distances, np.sum((points - median @ points) ** 2, axis=1))


def test_geometric_median_of_identical_or_no_points_is_finite():
    gram = np.ones((3, 3))
    combination = geometric_median_weights(gram, np.ones(3))
    assert np.all(np.isfinite(combination)) and np.isclose(combination.sum(), 1.0)
    assert geometric_median_weights(np.zeros((0, 0)), np.zeros(0)).size == 0
