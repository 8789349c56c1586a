"""Tests for cosine screening of client updates and loss-delta votes."""

import math

import numpy as np
import pytest

from bcsfl_flower.screening import (
    _majority_threshold,
    accept_vote,
    best_candidate_vote,
    cosine_similarity_matrix,
    flatten_updates,
    loss_deltas,
    screen_updates,
)


def reference_cosines(updates):
    """Pairwise cosines one pair at a time, the definition the Gram version must match."""
    k = len(updates)
    result = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            a = updates[i].astype(np.float64)
            b = updates[j].astype(np.float64)
            result[i, j] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return result


def planted_minority(rng, num_honest, num_attackers, dim, honest_noise, attacker_noise=0.5):
    """Honest updates share a direction plus heterogeneous noise; attackers negate it.

    Noise vectors have norm ``scale`` relative to the unit shared direction, so an honest
    client with noise ``s`` has cosine ``1 / sqrt(1 + s^2)`` to the shared direction.
    Every update gets its own magnitude, as local learning rates and data sizes differ.
    Returns the shuffled updates and a boolean mask of the attackers.
    """
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)

    def noise(scale):
        return scale * rng.normal(size=dim) / math.sqrt(dim)

    honest = [direction + noise(s) for s in honest_noise[:num_honest]]
    attackers = [-direction + noise(attacker_noise) for _ in range(num_attackers)]
    updates = np.array(honest + attackers)
    updates *= rng.uniform(0.01, 3.0, size=(len(updates), 1))
    is_attacker = np.array([False] * num_honest + [True] * num_attackers)
    order = rng.permutation(len(updates))
    return updates[order].astype(np.float32), is_attacker[order]


# ----- flatten_updates ------------------------------------------------------------------
def test_flatten_updates_stacks_differences():
    rng = np.random.default_rng(0)
    global_arrays = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    clients = [[g + rng.normal(size=g.shape) for g in global_arrays] for _ in range(3)]
    updates = flatten_updates(clients, global_arrays)
    expected = np.array(
        [
            np.concatenate([(c - g).ravel() for c, g in zip(arrays, global_arrays, strict=True)])
            for arrays in clients
        ]
    )
    assert updates.shape == (3, 10)
    assert updates.dtype == np.float32
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    assert flatten_updates(clients, global_arrays, dtype=np.float64).dtype == np.float64


def test_flatten_updates_rejects_mismatched_arrays():
    global_arrays = [np.zeros((2, 2)), np.zeros(3)]
    with pytest.raises(ValueError, match="client 0 sent 1 arrays"):
        flatten_updates([[np.zeros((2, 2))]], global_arrays)
    with pytest.raises(ValueError, match=r"client 1, array 1: shape \(4,\)"):
        good, bad = [np.zeros((2, 2)), np.zeros(3)], [np.zeros((2, 2)), np.zeros(4)]
        flatten_updates([good, bad], global_arrays)
    with pytest.raises(ValueError, match="floating"):
        flatten_updates([], global_arrays, dtype=np.int32)


# ----- cosine_similarity_matrix ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cosine_matrix_matches_pairwise_definition(dtype):
    rng = np.random.default_rng(1)
    updates = rng.normal(size=(6, 257)).astype(dtype)
    # A tiny block budget forces the float64 accumulation over many column blocks.
    similarity = cosine_similarity_matrix(updates, block_bytes=6 * 8 * 10)
    assert similarity.dtype == np.float64
    np.testing.assert_allclose(similarity, reference_cosines(updates), atol=1e-12)
    np.testing.assert_array_equal(similarity, similarity.T)
    np.testing.assert_array_equal(np.diag(similarity), 1.0)


def test_cosine_matrix_accumulates_float32_input_in_float64():
    # A million float32 values whose float32 dot product loses precision.
    rng = np.random.default_rng(2)
    updates = (1.0 + 1e-3 * rng.normal(size=(2, 1_000_000))).astype(np.float32)
    exact = reference_cosines(updates)[0, 1]
    assert abs(cosine_similarity_matrix(updates)[0, 1] - exact) < 1e-12


def test_zero_updates_are_finite():
    updates = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 4.0, 6.0], [0.0, 0.0, 0.0]])
    similarity = cosine_similarity_matrix(updates)
    assert np.all(np.isfinite(similarity))
    np.testing.assert_allclose(similarity[0, 2], 1.0)
    np.testing.assert_array_equal(similarity[1], [0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(similarity[:, 3], [0.0, 0.0, 0.0, 1.0])
    all_zero = cosine_similarity_matrix(np.zeros((3, 5), dtype=np.float32))
    np.testing.assert_array_equal(all_zero, np.eye(3))


def test_tiny_updates_stay_finite_and_huge_ones_are_an_error():
    # Squares of 1e-300 underflow to 0: such rows count as zero updates, not NaN.
    tiny = np.array([[1e-300, 1e-300], [1e-300, -1e-300], [1.0, 1.0]])
    similarity = cosine_similarity_matrix(tiny)
    assert np.all(np.isfinite(similarity))
    np.testing.assert_array_equal(similarity, np.eye(3))
    denormal = np.array([[1e-45, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert np.all(np.abs(cosine_similarity_matrix(denormal)) <= 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        cosine_similarity_matrix(np.array([[3e200, 3e200], [1.0, 1.0]]))  # squares overflow


def test_cosine_matrix_edge_shapes_and_bad_input():
    assert cosine_similarity_matrix(np.zeros((0, 4))).shape == (0, 0)
    np.testing.assert_array_equal(cosine_similarity_matrix(np.ones((1, 4))), [[1.0]])
    with pytest.raises(ValueError, match="2-D"):
        cosine_similarity_matrix(np.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        cosine_similarity_matrix(np.array([[1.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        cosine_similarity_matrix(np.array([[1.0, np.inf], [1.0, 1.0]], dtype=np.float32))


# ----- screen_updates -------------------------------------------------------------------
@pytest.mark.parametrize(("tau", "max_noise"), [(0.5, 1.5), (0.7, 0.95)])
def test_planted_flipped_minority_is_rejected_and_heterogeneous_honest_kept(tau, max_noise):
    rng = np.random.default_rng(3)
    # Honest noise from 0.2 to max_noise: the cosine to the shared direction ranges from
    # 0.98 down to 0.55 (tau=0.5) or 0.72 (tau=0.7).
    noise = np.linspace(0.2, max_noise, 7)
    updates, is_attacker = planted_minority(rng, 7, 3, 5_000, noise)
    similarity = cosine_similarity_matrix(updates)
    honest_block = similarity[np.ix_(~is_attacker, ~is_attacker)]
    # The honest clients really are heterogeneous: some honest pairs are below tau, so
    # screening must link them through the others (the tau-graph's connectivity).
    assert honest_block.min() < tau
    assert similarity[np.ix_(is_attacker, ~is_attacker)].max() < 0

    result = screen_updates(similarity, tau)
    assert set(result.trusted) == set(np.flatnonzero(~is_attacker))
    assert set(result.rejected) == set(np.flatnonzero(is_attacker))
    for i in result.rejected:
        assert f"below tau={tau:.2f}" in result.reasons[i]
    for i in result.trusted:
        assert result.reasons[i].startswith("trusted")
        assert result.labels[i] == result.trusted_label
    # The honest majority already clusters at tau, so the fallback leaves tau alone.
    fallback = screen_updates(similarity, tau, majority_fallback=True)
    assert fallback.tau_used == tau
    assert fallback.trusted == result.trusted


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
    is_attacker = np.array([k in (2, 5, 8) for k in range(10)])
    clients = []
    for attacker in is_attacker:
        xk, yk = sample(300)
        if attacker:
            yk = classes - 1 - yk
        local = global_weights.copy()
        for _ in range(5):
            local -= 0.5 * gradient(local, xk, yk)
        clients.append([local])
    similarity = cosine_similarity_matrix(flatten_updates(clients, [global_weights]))
    for tau in (0.5, 0.7):
        result = screen_updates(similarity, tau)
        assert result.rejected == tuple(np.flatnonzero(is_attacker))


def chain_attack(rng, theta_degrees=40.0, num_honest=7, dim=400):
    """Honest updates around e1, plus attackers a_k at angle k * theta in the (e1, e2) plane.

    Each attacker is within theta of the next, and a_1 is within theta of the honest
    direction, so at tau = cos(theta) - margin the tau-graph chains all attackers into
    the honest component although the last ones point against it.
    """
    basis = np.eye(dim)
    honest = [basis[0] + 0.3 * rng.normal(size=dim) / math.sqrt(dim) for _ in range(num_honest)]
    angles = np.deg2rad(theta_degrees) * np.arange(1, 5)
    attackers = [math.cos(a) * basis[0] + math.sin(a) * basis[1] for a in angles]
    return np.array(honest + attackers)


def test_chain_of_weak_links_is_guarded_by_mean_direction():
    updates = chain_attack(np.random.default_rng(5))
    similarity = cosine_similarity_matrix(updates)
    honest = list(range(7))  # attackers are 7 (at 40 degrees) to 10 (at 160 degrees)
    tau = 0.7
    # Precondition: everything is one connected component of the tau-graph.
    plain = screen_updates(similarity, tau, min_mean_similarity=None)
    assert plain.trusted == tuple(range(11))
    assert similarity[10, honest].max() < -0.8  # the last attacker opposes the honest ones

    guarded = screen_updates(similarity, tau)  # default guard: not against the mean
    assert set(honest) <= set(guarded.trusted)
    assert {9, 10} <= set(guarded.rejected)
    for i in (9, 10):
        assert "mean direction" in guarded.reasons[i]
        assert guarded.mean_similarity[i] < 0.0
        assert guarded.labels[i] == guarded.trusted_label

    strict = screen_updates(similarity, tau, min_mean_similarity=tau)
    assert strict.trusted == tuple(honest + [7])
    assert all(strict.mean_similarity[i] >= tau for i in strict.trusted)


def orthogonal_honest_and_colluding_attackers(rng, num_honest=7, num_attackers=3, dim=2_000):
    """Late-training, non-IID shape: honest updates are nearly orthogonal to each other
    (a weak shared direction under client-specific noise) while the attackers, who all
    push towards the same wrong optimum, agree with each other and oppose the honest
    direction. Measured on MNIST with Dirichlet(0.5) partitions, honest cosines are
    around 0.0-0.1 after a few rounds and label flippers' around 0.3-0.6."""
    shared, wrong = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    honest = [0.3 * shared + rng.normal(size=dim) / math.sqrt(dim) for _ in range(num_honest)]
    attackers = [
        -0.3 * shared + 0.9 * wrong + 0.4 * rng.normal(size=dim) / math.sqrt(dim)
        for _ in range(num_attackers)
    ]
    return np.array(honest + attackers)


def test_majority_fallback_when_honest_updates_are_nearly_orthogonal():
    updates = orthogonal_honest_and_colluding_attackers(np.random.default_rng(8))
    similarity = cosine_similarity_matrix(updates)
    honest, attackers = set(range(7)), {7, 8, 9}
    assert similarity[np.ix_(range(7), range(7))][np.triu_indices(7, 1)].max() < 0.3
    assert similarity[np.ix_(range(7, 10), range(7, 10))].min() > 0.7

    # The paper's rule trusts the only cluster there is: the colluding attackers.
    plain = screen_updates(similarity, 0.7)
    assert set(plain.trusted) == attackers

    result = screen_updates(similarity, 0.7, majority_fallback=True)
    assert set(result.trusted) <= honest
    assert len(result.trusted) >= 6  # a majority of the 10 clients
    assert attackers <= set(result.rejected)
    assert result.tau_used < 0.3
    assert "lowered from 0.70" in result.reasons[7]


def test_majority_threshold_matches_brute_force():
    rng = np.random.default_rng(9)
    for size in (2, 3, 7, 12):
        similarity = cosine_similarity_matrix(rng.normal(size=(size, 5)))
        for need in range(1, size + 1):
            feasible = []
            for level in np.unique(similarity[np.triu_indices(size, 1)]):
                adjacency = similarity >= level
                np.fill_diagonal(adjacency, False)
                reach = np.linalg.matrix_power(
                    adjacency.astype(int) + np.eye(size, dtype=int), size
                )
                if (reach > 0).sum(axis=1).max() >= need:
                    feasible.append(level)
            expected = max(feasible) if need > 1 else 1.0
            assert _majority_threshold(similarity, need) == expected


def test_norm_check_rejects_oversized_updates():
    rng = np.random.default_rng(10)
    updates, is_attacker = planted_minority(rng, 7, 0, 1_000, np.linspace(0.2, 0.6, 7))
    # Three boosted updates that point roughly the honest way, but 10x longer.
    boosted = (
        10.0
        * np.median(np.linalg.norm(updates, axis=1))
        * updates[:3]
        / np.linalg.norm(updates[:3], axis=1, keepdims=True)
    )
    updates = np.vstack([updates, boosted])
    similarity, norms = cosine_similarity_matrix(updates, return_norms=True)
    np.testing.assert_allclose(
        norms, np.linalg.norm(updates.astype(np.float64), axis=1), rtol=1e-12
    )
    assert screen_updates(similarity, 0.5).rejected == ()  # cosine alone cannot see them
    result = screen_updates(similarity, 0.5, norms=norms, max_norm_ratio=3.0)
    assert result.rejected == (7, 8, 9)
    assert all("above max_norm_ratio=3.00" in result.reasons[i] for i in (7, 8, 9))
    assert result.labels[7:] == (-1, -1, -1)
    # Zero median norm: the ratio is undefined, so the check is skipped.
    zeros = np.zeros((3, 4))
    zeros[0, 0] = 1.0
    similarity, norms = cosine_similarity_matrix(zeros, return_norms=True)
    assert len(screen_updates(similarity, 0.5, norms=norms, max_norm_ratio=3.0).trusted) == 1


def test_norm_check_input_validation():
    with pytest.raises(ValueError, match="needs the update norms"):
        screen_updates(np.eye(2), 0.5, max_norm_ratio=3.0)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        screen_updates(np.eye(2), 0.5, norms=[1.0, 1.0], max_norm_ratio=0.0)
    with pytest.raises(ValueError, match="norms"):
        screen_updates(np.eye(2), 0.5, norms=[1.0, -1.0], max_norm_ratio=2.0)


def test_ties_in_size_go_to_stake_then_lowest_index():
    e1, e2 = np.eye(2)
    updates = np.array([e1, e2, e1 * 2, e2 * 3, e1 * 0.5, e2 * 0.1])  # two clusters of 3
    similarity = cosine_similarity_matrix(updates)
    assert screen_updates(similarity, 0.7).trusted == (0, 2, 4)
    stakes = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
    result = screen_updates(similarity, 0.7, stakes)
    assert result.trusted == (1, 3, 5)
    assert "max 0.00" in result.reasons[0]
    # Equal stakes: the cluster with the lowest index wins, whatever its direction.
    swapped = cosine_similarity_matrix(updates[[1, 0, 3, 2, 5, 4]])
    assert screen_updates(swapped, 0.7).trusted == (0, 2, 4)


def test_larger_cluster_beats_more_stake():
    e1, e2 = np.eye(2)
    similarity = cosine_similarity_matrix(np.array([e1, e1, e1, e2, e2]))
    assert screen_updates(similarity, 0.5, [1, 1, 1, 100, 100]).trusted == (0, 1, 2)


def test_single_and_no_client():
    result = screen_updates(np.ones((1, 1)), 0.7)
    assert result.trusted == (0,) and result.rejected == ()
    assert result.reasons[0].startswith("trusted")
    empty = screen_updates(np.zeros((0, 0)), 0.7)
    assert (empty.trusted, empty.rejected, empty.reasons, empty.labels) == ((), (), (), ())
    assert empty.trusted_label == -1 and math.isnan(empty.tau_used)


def test_zero_update_is_rejected_with_reason():
    rng = np.random.default_rng(6)
    updates, is_attacker = planted_minority(rng, 5, 0, 300, [0.2] * 5)
    updates = np.vstack([updates, np.zeros(300, dtype=np.float32)])
    similarity = cosine_similarity_matrix(updates)
    result = screen_updates(similarity, 0.7)
    assert result.rejected == (5,)
    assert "max 0.00" in result.reasons[5]


def test_five_hundred_clients():
    rng = np.random.default_rng(7)
    updates, is_attacker = planted_minority(rng, 350, 150, 2_000, rng.uniform(0.2, 0.9, 350))
    similarity = cosine_similarity_matrix(updates)
    assert similarity.shape == (500, 500)
    assert np.all(np.isfinite(similarity))
    result = screen_updates(similarity, 0.5)
    assert set(result.rejected) == set(np.flatnonzero(is_attacker))
    assert len(result.reasons) == 500
    similarity, norms = cosine_similarity_matrix(updates, return_norms=True)
    improved = screen_updates(
        similarity, 0.7, norms=norms, max_norm_ratio=3.0, majority_fallback=True
    )
    assert set(improved.rejected) == set(np.flatnonzero(is_attacker))
    # Independent random directions: nobody links, so one client is trusted.
    isolated = cosine_similarity_matrix(rng.normal(size=(500, 2_000)).astype(np.float32))
    assert len(screen_updates(isolated, 0.5).trusted) == 1


@pytest.mark.parametrize(
    ("similarity", "tau", "stakes", "match"),
    [
        (np.ones((2, 3)), 0.5, None, "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.5, None, "non-finite"),
        (np.eye(2), 1.5, None, "tau"),
        (np.eye(2), float("nan"), None, "tau"),
        (np.eye(2), 0.5, [1.0], "2 entries"),
        (np.eye(2), 0.5, [1.0, -1.0], "stakes"),
    ],
)
def test_screen_rejects_bad_input(similarity, tau, stakes, match):
    with pytest.raises(ValueError, match=match):
        screen_updates(similarity, tau, stakes)


def test_screen_rejects_bad_guard():
    with pytest.raises(ValueError, match="min_mean_similarity"):
        screen_updates(np.eye(2), 0.5, min_mean_similarity=2.0)


# ----- loss deltas and votes ------------------------------------------------------------
def test_loss_deltas():
    np.testing.assert_allclose(loss_deltas(2.0, [1.5, 2.5, 2.0]), [0.5, -0.5, 0.0])
    deltas = loss_deltas(1.0, [np.nan, np.inf])
    assert np.isnan(deltas[0]) and deltas[1] == -np.inf
    with pytest.raises(ValueError, match="1-D"):
        loss_deltas(1.0, [[1.0]])
    with pytest.raises(TypeError, match="baseline_loss"):
        loss_deltas("1.0", [1.0])


def test_best_candidate_vote():
    ids = ["c0", "c1", "c2"]
    assert best_candidate_vote(ids, [0.1, 0.4, 0.2]) == "c1"
    assert best_candidate_vote(ids, [0.4, 0.1, 0.4]) == "c0"  # ties: first listed
    assert best_candidate_vote(ids, [np.nan, -np.inf, -3.0]) == "c2"  # paper: always votes
    assert best_candidate_vote(ids, [np.nan, -np.inf, np.nan]) is None
    assert best_candidate_vote(ids, [-0.1, -0.2, -0.3], min_delta=0.0) is None
    assert best_candidate_vote(ids, [-0.1, 0.0, -0.3], min_delta=0.0) == "c1"
    assert best_candidate_vote([], []) is None
    with pytest.raises(ValueError, match="one entry per candidate"):
        best_candidate_vote(ids, [0.1, 0.2])
    with pytest.raises(ValueError, match="duplicates"):
        best_candidate_vote(["a", "a"], [0.1, 0.2])


def test_accept_vote_boundary():
    assert accept_vote(0.0, 0.0)
    assert accept_vote(-0.05, 0.05)
    assert not accept_vote(-0.0500001, 0.05)
    assert accept_vote(np.float64(0.3), 0.0)
    assert not accept_vote(float("nan"), 1.0)
    assert not accept_vote(-np.inf, 1.0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            accept_vote(0.0, bad)


def _heterogeneous_federation(rng, num_honest=7, num_attackers=3, dim=5000):
    """Honest updates: a weak shared direction under strong independent noise (nearly
    orthogonal in raw form, as on non-IID MNIST); attackers share a deviation."""
    shared = rng.normal(size=dim)
    deviation = rng.normal(size=dim)
    honest = [0.3 * shared + rng.normal(size=dim) for _ in range(num_honest)]
    attackers = [
        0.3 * shared + 0.6 * deviation + rng.normal(size=dim) for _ in range(num_attackers)
    ]
    return np.stack(honest + attackers)


def test_median_centering_exposes_a_coherent_minority_that_raw_cosine_misses():
    from bcsfl_flower.screening import center_updates

    rng = np.random.default_rng(11)
    updates = _heterogeneous_federation(rng)
    attackers = {7, 8, 9}
    raw = screen_updates(cosine_similarity_matrix(updates), tau=0.7)
    assert set(raw.rejected) != attackers  # the paper's raw rule cannot tell them apart
    centred_similarity = cosine_similarity_matrix(center_updates(updates, "median"))
    centred = screen_updates(centred_similarity, tau=0.0, majority_fallback=True)
    # Every attacker goes; the majority fallback stops at the smallest majority, so at
    # most one heterogeneous honest client may be left out with them.
    assert attackers <= set(centred.rejected)
    assert len(set(centred.rejected) - attackers) <= 1


def test_centering_leaves_small_federations_and_none_unchanged():
    from bcsfl_flower.screening import MIN_CENTERED_UPDATES, center_updates

    updates = np.arange(12.0).reshape(MIN_CENTERED_UPDATES - 1, 3)
    assert center_updates(updates, "median") is updates
    big = np.arange(30.0).reshape(10, 3)
    assert center_updates(big, "none") is big
    np.testing.assert_allclose(np.median(center_updates(big, "median"), axis=0), 0.0)
    with pytest.raises(ValueError, match="centering"):
        center_updates(big, "mean")
