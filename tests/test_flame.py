"""FLAME as a baseline: its filter, clipping and seeded noise, as a function and a strategy."""

import byzfl
import numpy as np
import pytest

# Imported at collection (it takes seconds: scipy.stats and pandas come with it), so that
# the first test to cluster does not pay for it; flame.py imports it lazily.
import sklearn.cluster  # noqa: F401
from flower_messages import NodeGrid, update_replies
from flwr.app import Array, ArrayRecord, ConfigRecord

from bcsfl_vision.baselines import BASELINES, build_baseline
from bcsfl_vision.flame import FLAME_NOISE_LAMBDA, FlameStrategy, flame_admitted, flame_aggregate
from sim.robust.contenders import CONTENDERS

DIM = 40


def honest_updates(rng, count=14):
    common = rng.normal(size=DIM)
    return common + 0.3 * rng.normal(size=(count, DIM))


def _clipped_mean(updates, admitted):
    norms = np.linalg.norm(updates, axis=1)
    bound = np.median(norms)
    kept = updates[admitted] * np.minimum(1.0, bound / norms[admitted])[:, None]
    return kept.mean(axis=0)


def test_flame_drops_a_coordinated_group_opposed_to_the_honest_majority():
    rng = np.random.default_rng(0)
    honest = honest_updates(rng)
    attack = np.tile(-3.0 * honest.mean(axis=0), (6, 1))
    updates = np.vstack([honest, attack])
    admitted = flame_admitted(updates)
    assert set(admitted) <= set(range(14))  # no attacker
    assert len(admitted) >= len(updates) // 2 + 1  # a majority cluster
    step = flame_aggregate(updates, np.random.default_rng(0), noise_lambda=0.0)
    np.testing.assert_allclose(step, _clipped_mean(updates, admitted))
    target = honest.mean(axis=0)
    assert np.linalg.norm(step - target) < 0.2 * np.linalg.norm(target)
    assert np.linalg.norm(updates.mean(axis=0) - target) > np.linalg.norm(target)


def test_flame_keeps_everyone_when_no_majority_can_be_told_apart():
    np.testing.assert_array_equal(flame_admitted(np.eye(6)), np.arange(6))  # all orthogonal
    np.testing.assert_array_equal(flame_admitted(np.ones((2, DIM))), [0, 1])
    step = flame_aggregate(np.ones((1, DIM)), np.random.default_rng(0), noise_lambda=0.0)
    np.testing.assert_allclose(step, np.ones(DIM))


def test_flame_clips_a_long_admitted_update_to_the_median_norm_of_all_updates():
    rng = np.random.default_rng(1)
    updates = honest_updates(rng, 15)
    admitted = flame_admitted(updates)
    long = admitted[0]
    updates[long] *= 40.0  # model replacement: an admitted direction, 40 times as long
    # Cosine distances ignore length: the filter lets it through as before.
    np.testing.assert_array_equal(flame_admitted(updates), admitted)
    norms = np.linalg.norm(updates, axis=1)
    bound = np.median(norms)
    step = flame_aggregate(updates, np.random.default_rng(0), noise_lambda=0.0)
    np.testing.assert_allclose(step, _clipped_mean(updates, admitted))
    assert np.linalg.norm(step) <= bound * (1 + 1e-9)  # a mean of vectors no longer than it
    unclipped = updates[admitted].mean(axis=0)
    assert np.linalg.norm(unclipped) > 2 * bound  # what the clipping took away
    # The long update weighs exactly as much as an update of the median norm.
    without = np.setdiff1d(admitted, [long])
    contribution = step * len(admitted) - _clipped_mean(updates, without) * len(without)
    assert np.linalg.norm(contribution) == pytest.approx(bound)


def test_flame_noise_is_seeded_and_scales_with_lambda_and_the_median_norm():
    rng = np.random.default_rng(2)
    updates = honest_updates(rng, 12)
    bound = np.median(np.linalg.norm(updates, axis=1))
    clean = flame_aggregate(updates, np.random.default_rng(5), noise_lambda=0.0)

    def noise(lam, seed=5):
        return flame_aggregate(updates, np.random.default_rng(seed), noise_lambda=lam) - clean

    np.testing.assert_array_equal(noise(0.01), noise(0.01))  # same seed, same noise
    assert not np.allclose(noise(0.01), noise(0.01, seed=6))
    np.testing.assert_allclose(noise(0.02), 2 * noise(0.01))
    expected = 0.01 * bound * np.random.default_rng(5).normal(size=DIM)
    np.testing.assert_allclose(noise(0.01), expected, atol=1e-12)
    default = flame_aggregate(updates, np.random.default_rng(5)) - clean
    np.testing.assert_allclose(default, noise(FLAME_NOISE_LAMBDA))
    assert FLAME_NOISE_LAMBDA == 0.001
    with pytest.raises(ValueError, match="non-negative"):
        flame_aggregate(updates, np.random.default_rng(5), noise_lambda=-1.0)


def _run_round(strategy, server_round, weights, updates):
    arrays = ArrayRecord({"w": Array(weights)})
    list(strategy.configure_train(server_round, arrays, ConfigRecord(), NodeGrid()))
    new, metrics = strategy.aggregate_train(server_round, update_replies(weights, updates))
    return new["w"].numpy(), metrics


def test_the_strategy_aggregates_flower_replies_as_the_pure_function_does():
    rng = np.random.default_rng(3)
    weights = np.zeros(DIM, np.float32)
    honest = honest_updates(rng, 14)
    updates = np.vstack([honest, np.tile(-3.0 * honest.mean(axis=0), (6, 1))])
    strategy = FlameStrategy(seed=7, fraction_evaluate=0.0)
    new, metrics = _run_round(strategy, 3, weights, updates)
    sent = updates.astype(np.float32).astype(np.float64)  # what the replies carry
    expected = flame_aggregate(sent, np.random.default_rng([7, 3]))
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
    assert metrics is not None
    again, _ = _run_round(FlameStrategy(seed=7, fraction_evaluate=0.0), 3, weights, updates)
    np.testing.assert_array_equal(again, new)  # a rerun adds the same noise
    later, _ = _run_round(strategy, 4, weights, updates)
    assert not np.array_equal(later, new)  # each round draws its own


def test_flame_is_a_baseline_and_a_bench_contender():
    assert "flame" in BASELINES
    strategy = build_baseline("flame", num_nodes=20, attacker_fraction=0.3)
    assert isinstance(strategy, FlameStrategy)
    assert strategy.noise_lambda == FLAME_NOISE_LAMBDA and strategy.fraction_evaluate == 0.0
    contender = CONTENDERS["flame"]
    assert isinstance(contender.build(20, 6), FlameStrategy)
    target = contender.target(20, 6)
    updates = honest_updates(np.random.default_rng(4), 20)
    step = target(updates)
    assert step.shape == (DIM,)
    np.testing.assert_array_equal(step, target(updates))  # the attacks see a fixed function
    attack = byzfl.Optimal_InnerProductManipulation(agg=target, pre_agg_list=[], f=6)
    vector = np.asarray(attack(updates[:14]))
    assert vector.shape == (DIM,) and np.all(np.isfinite(vector))
