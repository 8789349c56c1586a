"""Screening on the Gram matrix: length outliers, and the stake-majority cluster."""

import math

import numpy as np
import pytest

from bcsfl_flower.round.bounds import bound_updates
from bcsfl_flower.round.screening import (
    MIN_CLUSTERED,
    ProfileDirections,
    UpdateDirections,
    bound_and_screen,
    centred_cosines,
    screen_updates,
    split_threshold,
)
from bcsfl_flower.round.settings import RoundSettings


def screen(updates, stakes=None, counts=None):
    updates = np.asarray(updates, dtype=np.float64)
    n = len(updates)
    stakes = np.ones(n) if stakes is None else np.asarray(stakes, dtype=np.float64)
    counts = np.full(n, 100.0) if counts is None else counts
    gram = updates @ updates.T
    bounds = bound_updates(np.sqrt(np.diag(gram)), counts, stakes)
    return screen_updates(gram, bounds)


def planted(rng, num_honest, num_attackers, dim=400, noise=0.7, attacker_noise=0.5):
    """Honest updates share a direction plus heterogeneous noise; attackers negate it."""
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    honest = [direction + noise * rng.normal(size=dim) / math.sqrt(dim) for _ in range(num_honest)]
    attackers = [
        -direction + attacker_noise * rng.normal(size=dim) / math.sqrt(dim)
        for _ in range(num_attackers)
    ]
    updates = np.array(honest + attackers) * rng.uniform(
        0.5, 1.5, size=(num_honest + num_attackers, 1)
    )
    return updates, set(range(num_honest, num_honest + num_attackers))


def test_split_threshold_is_the_structureless_distance_plus_the_margin():
    assert split_threshold(20, 0.05) == pytest.approx(1 + 1 / 19 + 0.05)
    assert split_threshold(10, 0.0) == pytest.approx(1 + 1 / 9)
    assert split_threshold(1) == math.inf


def test_centred_cosines_match_the_centred_updates():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(6, 30))
    centred = updates - updates.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(centred_cosines(updates @ updates.T), unit @ unit.T, atol=1e-12)


@pytest.mark.parametrize(
    ("num_honest", "num_attackers"), [(9, 1), (18, 2), (14, 6), (7, 3), (12, 8)]
)
def test_a_planted_opposed_minority_is_rejected_and_every_honest_client_kept(
    num_honest, num_attackers
):
    rng = np.random.default_rng(num_honest * 100 + num_attackers)
    updates, attackers = planted(rng, num_honest, num_attackers)
    result = screen(updates)
    assert set(result.rejected) == attackers
    for row in result.rejected:
        assert "outside the stake-majority cluster" in result.reasons[row]
    assert all(result.reasons[row].startswith("trusted") for row in result.trusted)


@pytest.mark.parametrize("n", [5, 10, 20, 50])
def test_unstructured_honest_updates_are_all_trusted(n):
    # Non-IID honest clients: a weak shared direction, mostly their own.
    rng = np.random.default_rng(n)
    updates, _ = planted(rng, n, 0, noise=3.0)
    assert screen(updates).rejected == ()


def test_long_updates_are_rejected_before_clustering_with_their_ratio():
    rng = np.random.default_rng(1)
    updates, _ = planted(rng, 8, 0)
    updates = np.vstack([updates, 10 * updates[0], 1e6 * updates[1]])
    result = screen(updates)
    assert result.rejected == (8, 9)
    assert "x the stake-weighted median, above 2.50x" in result.reasons[9]


def test_half_the_clients_with_half_the_stake_are_not_split_but_a_third_of_the_stake_is():
    rng = np.random.default_rng(2)
    updates, attackers = planted(rng, 10, 10)
    even = screen(updates)
    assert even.rejected == () and even.contested  # no stake majority: both sides stay
    assert "contested" in even.reasons[0] and "60% of the stake" in even.reasons[0]
    stakes = np.array([0.5 if row in attackers else 1.0 for row in range(20)])
    minority = screen(updates, stakes)
    assert set(minority.rejected) == attackers and not minority.contested
    # The majority of clients does not win against the majority of stake.
    stakes = np.array([1.0 if row in attackers else 0.4 for row in range(20)])
    assert set(screen(updates, stakes).trusted) == attackers


def test_label_flipping_with_real_gradients_is_rejected():
    # Softmax regression on Gaussian class clusters; three of ten clients flip labels
    # y -> 9 - y. Each client runs a few full-batch gradient steps from the same global
    # model, as a Flower client would, and the updates are the weight differences.
    rng = np.random.default_rng(4)
    classes, features = 10, 20
    means = 1.5 * rng.normal(size=(classes, features))

    def sample(n):
        labels = rng.integers(0, classes, size=n)
        return means[labels] + rng.normal(size=(n, features)), labels

    def gradient(weights, x, y):
        logits = x @ weights
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        return x.T @ p / len(y)

    global_weights = np.zeros((features, classes))
    x, y = sample(2_000)
    for _ in range(20):
        global_weights -= 0.5 * gradient(global_weights, x, y)
    attackers = {2, 5, 8}
    updates = []
    for k in range(10):
        xk, yk = sample(300)
        if k in attackers:
            yk = classes - 1 - yk
        local = global_weights.copy()
        for _ in range(5):
            local -= 0.5 * gradient(local, xk, yk)
        updates.append((local - global_weights).ravel())
    assert set(screen(updates).rejected) == attackers


def test_too_few_updates_to_cluster_are_all_trusted_unless_too_long():
    updates = np.eye(MIN_CLUSTERED - 1)
    assert screen(updates).rejected == ()
    assert screen(np.zeros((0, 3))).trusted == ()
    assert screen([[1.0, 2.0]]).trusted == (0,)


def test_zero_updates_are_trusted_and_finite():
    result = screen(np.zeros((6, 10)))
    assert result.trusted == tuple(range(6))


def test_five_hundred_clients():
    rng = np.random.default_rng(7)
    updates, attackers = planted(rng, 400, 100, dim=2_000)
    result = screen(updates)
    assert set(result.rejected) == attackers


# ----- DP updates: the profile geometry ---------------------------------------------------
def dp_federation(rng, num_honest, num_flippers, dim=20_000, noise_ratio=6.0):
    """Updates whose own DP noise is ``noise_ratio`` times as long as their signal.

    Honest signals share a direction with heterogeneity; a flipper's signal leans
    against it and towards the flipped classes' own direction.
    """
    shared, flipped = rng.normal(size=(2, dim)) / math.sqrt(dim)
    signals = [shared + 0.6 * rng.normal(size=dim) / math.sqrt(dim) for _ in range(num_honest)]
    signals += [
        -0.5 * shared + flipped + 0.6 * rng.normal(size=dim) / math.sqrt(dim)
        for _ in range(num_flippers)
    ]
    noise = rng.normal(size=(len(signals), dim)) * noise_ratio / math.sqrt(dim)
    return np.array(signals) + noise, set(range(num_honest, num_honest + num_flippers))


def screen_noisy(updates, settings):
    gram = updates @ updates.T
    return bound_and_screen(gram, np.full(len(gram), 100.0), np.ones(len(gram)), settings)[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_under_dp_noise_profiles_find_the_flippers_that_unit_updates_cannot(seed):
    updates, flippers = dp_federation(np.random.default_rng(seed), 14, 6)
    plain = screen_noisy(updates, RoundSettings())
    assert set(plain.rejected) == set()  # every unit update is near-orthogonal
    noisy = screen_noisy(updates, RoundSettings(noisy_updates=True))
    assert set(noisy.rejected) == flippers
    assert "outside the stake-majority cluster" in noisy.reasons[min(flippers)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_under_dp_noise_profiles_reject_no_honest_client(seed):
    updates, _ = dp_federation(np.random.default_rng(seed), 20, 0)
    assert screen_noisy(updates, RoundSettings(noisy_updates=True)).rejected == ()


def test_profiles_are_the_gram_rows_without_the_diagonal():
    gram = np.array([[9.0, 1.0, -2.0], [1.0, 4.0, 3.0], [-2.0, 3.0, 16.0]])
    hollow = gram - np.diag(np.diag(gram))
    np.testing.assert_allclose(ProfileDirections().gram(gram), hollow @ hollow.T)
    np.testing.assert_allclose(UpdateDirections().gram(gram), gram)
