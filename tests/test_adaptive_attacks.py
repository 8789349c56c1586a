"""The attacks adaptive to the defence: shapes, and what each one promises."""

import numpy as np
import pytest

from sim.robust import attacks as base
from sim.robust.adaptive_attacks import (
    ADAPTIVE_ATTACKS,
    GAMMA_START,
    MedianNorm,
    MimicSetApart,
    MinMax,
    MinSum,
    NoisyCopies,
    OwnDeviation,
    largest_gamma,
)
from sim.robust.attacks import Attack, RoundView

DIM = 40
ATTACKERS = 6


def honest_updates(rng, count=14):
    common = rng.normal(size=DIM)
    return common + 0.3 * rng.normal(size=(count, DIM))


def _view(seed=0, attackers=ATTACKERS, honest=None):
    rng = np.random.default_rng(seed)
    honest = honest_updates(rng) if honest is None else honest
    own = honest_updates(rng, attackers)
    return RoundView(7, honest, own, lambda vectors: vectors.mean(axis=0), rng)


def _cosine(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_names_are_the_briefs_and_new_to_the_bench():
    names = [attack.name for attack in ADAPTIVE_ATTACKS]
    assert names == [
        "noisy-copies",
        "own-deviation",
        "median-norm",
        "min-max",
        "min-sum",
        "mimic-set-apart",
    ]
    base_names = {
        value.name
        for value in vars(base).values()
        if isinstance(value, type) and issubclass(value, Attack) and "name" in vars(value)
    }
    assert "sign-flip" in base_names and not set(names) & base_names


@pytest.mark.parametrize("attack", ADAPTIVE_ATTACKS, ids=lambda attack: attack.name)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_adaptive_attack_returns_finite_updates_one_per_attacker(attack, dtype):
    view = _view(seed=1)
    view = RoundView(7, view.honest.astype(dtype), view.own.astype(dtype), view.target, view.rng)
    updates = attack().updates(view)
    assert attack().training(7) == "honest"
    assert updates.shape == (ATTACKERS, DIM)
    assert np.all(np.isfinite(updates))


def test_noisy_copies_differ_but_are_centred_on_the_sign_flipped_mean():
    view = _view(seed=2, attackers=500)
    updates = NoisyCopies().updates(view)
    mean, std = view.honest.mean(axis=0), view.honest.std(axis=0, ddof=1)
    distinct = np.linalg.norm(updates[:, None] - updates[None], axis=-1)
    assert np.all(distinct[~np.eye(len(updates), dtype=bool)] > 0)
    standardised = (updates + mean) / std  # N(0, 1) per coordinate around -mean
    assert np.abs(standardised.mean(axis=0)).max() < 5 / np.sqrt(len(updates))
    assert abs(standardised.std() - 1) < 0.02


def test_noisy_copies_follow_the_rounds_rng():
    first, second = NoisyCopies().updates(_view(3)), NoisyCopies().updates(_view(3))
    np.testing.assert_array_equal(first, second)


def test_own_deviation_is_alie_plus_each_attackers_own_deviation():
    view = _view(seed=4)
    updates = OwnDeviation().updates(view)
    deviations = view.own - view.own.mean(axis=0)
    alie = view.honest.mean(axis=0) + 1.5 * view.honest.std(axis=0, ddof=1)
    np.testing.assert_allclose(updates - deviations, np.tile(alie, (ATTACKERS, 1)))
    np.testing.assert_allclose(updates[1:] - updates[0], deviations[1:] - deviations[0])


def test_median_norm_flips_the_mean_at_the_median_honest_norm():
    view = _view(seed=5)
    updates = MedianNorm().updates(view)
    median = np.median(np.linalg.norm(view.honest, axis=1))
    np.testing.assert_allclose(np.linalg.norm(updates, axis=1), median)
    assert _cosine(updates[0], -view.honest.mean(axis=0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(updates, np.tile(updates[0], (ATTACKERS, 1)))


def _min_max_passes(vector, honest):
    to_honest = np.linalg.norm(honest - vector, axis=1).max()
    pairwise = np.linalg.norm(honest[:, None] - honest[None], axis=-1).max()
    return to_honest <= pairwise


def _min_sum_passes(vector, honest):
    to_honest = ((honest - vector) ** 2).sum()
    pairwise = ((honest[:, None] - honest[None]) ** 2).sum(axis=(1, 2)).max()
    return to_honest <= pairwise


@pytest.mark.parametrize(
    ("attack", "passes"), [(MinMax, _min_max_passes), (MinSum, _min_sum_passes)]
)
def test_distance_bounded_attacks_sit_at_their_constraints_boundary(attack, passes):
    view = _view(seed=6)
    honest = view.honest
    updates = attack().updates(view)
    np.testing.assert_array_equal(updates, np.tile(updates[0], (ATTACKERS, 1)))
    mean, direction = honest.mean(axis=0), -honest.std(axis=0, ddof=1)
    gamma = (updates[0] - mean) @ direction / (direction @ direction)
    np.testing.assert_allclose(updates[0], mean + gamma * direction)
    assert gamma > 0
    assert passes(updates[0], honest)
    assert not passes(mean + 1.01 * gamma * direction, honest)


def test_min_sum_strength_matches_its_closed_form():
    # No cross term around the mean: sum |x_i - m - g p|^2 = sum |x_i - m|^2 + h g^2 |p|^2.
    honest = _view(seed=7).honest
    mean, direction = honest.mean(axis=0), -honest.std(axis=0, ddof=1)
    spread = ((honest - mean) ** 2).sum()
    limit = ((honest[:, None] - honest[None]) ** 2).sum(axis=(1, 2)).max()
    expected = np.sqrt((limit - spread) / (len(honest) * direction @ direction))
    assert MinSum().gamma(honest) == pytest.approx(expected, rel=1e-6)


def test_each_distance_bounded_attack_stays_within_its_own_bound():
    honest = _view(seed=8).honest
    for attack in (MinMax(), MinSum()):
        gamma = attack.gamma(honest)
        assert attack.score(attack.malicious(honest, gamma), honest) <= attack.bound(honest)


def test_largest_gamma_searches_past_its_start_and_stops_at_zero_or_its_cap():
    assert largest_gamma(lambda gamma: gamma <= 123.4) == pytest.approx(123.4, rel=1e-8)
    assert largest_gamma(lambda gamma: gamma <= 0.01) == pytest.approx(0.01, rel=1e-6)
    assert largest_gamma(lambda gamma: gamma < 0) == 0.0
    capped = largest_gamma(lambda gamma: True)
    assert np.isfinite(capped) and capped >= GAMMA_START


def test_mimic_set_apart_copies_the_least_aligned_honest_update():
    view = _view(seed=9)
    honest = view.honest.copy()
    honest[5] = -0.5 * honest[5] + np.random.default_rng(10).normal(size=DIM)  # a rare client
    view = RoundView(7, honest, view.own, view.target, view.rng)
    updates = MimicSetApart().updates(view)
    mean = honest.mean(axis=0)
    least = int(np.argmin([_cosine(update, mean) for update in honest]))
    assert least == 5
    np.testing.assert_array_equal(updates, np.tile(honest[least], (ATTACKERS, 1)))
