"""Tests for stake-weighted committee draws (the stake ledger lives in round/stakes)."""

import hashlib
import itertools
import logging
import math

import numpy as np
import pytest
from scipy import stats

from bcsfl_flower.committee import (
    COMMITTEE_SEED_DOMAIN,
    Committee,
    committee_seed,
    draw_committee,
    draw_weighted_without_replacement,
)

HASH = hashlib.sha256(b"initial model").digest()
# Significance level of the statistical tests. The draws use fixed seeds, so each test is
# deterministic; the level says how unlikely a correct sampler is to fail a given seed.
ALPHA = 1e-3


def successive_sampling_probabilities(stakes, k):
    """Exact probability of every ordered k-sample under successive sampling.

    Enumerates all ordered sequences and multiplies the step probabilities
    S_i / (sum of the remaining stakes): the textbook definition, independent of the
    implementation under test.
    """
    n = len(stakes)
    probabilities = {}
    for sequence in itertools.permutations(range(n), k):
        remaining = math.fsum(stakes)
        p = 1.0
        for i in sequence:
            p *= stakes[i] / remaining
            remaining -= stakes[i]
        probabilities[sequence] = p
    return probabilities


# ----- committee_seed -------------------------------------------------------------------
def test_seed_follows_documented_encoding():
    message = b"BCSFL/committee/v1" + HASH + (7).to_bytes(8, "big")
    expected = int.from_bytes(hashlib.sha256(message).digest(), "big")
    assert COMMITTEE_SEED_DOMAIN == b"BCSFL/committee/v1"
    assert committee_seed(HASH, 7) == expected


def test_seed_accepts_hex_with_and_without_prefix():
    assert committee_seed(HASH.hex(), 3) == committee_seed(HASH, 3)
    assert committee_seed("0x" + HASH.hex(), 3) == committee_seed(HASH, 3)


def test_seed_depends_on_hash_and_round():
    other = hashlib.sha256(b"other model").digest()
    seeds = {committee_seed(HASH, r) for r in range(1, 50)} | {committee_seed(other, 1)}
    assert len(seeds) == 50


@pytest.mark.parametrize(
    ("previous", "server_round", "error"),
    [
        (HASH[:31], 1, ValueError),
        ("zz" * 32, 1, ValueError),
        (HASH.hex()[:-2], 1, ValueError),
        (HASH, -1, ValueError),
        (HASH, 2**64, ValueError),
        (HASH, True, TypeError),
        (HASH, 1.0, TypeError),
        (list(HASH), 1, TypeError),
    ],
)
def test_seed_rejects_bad_input(previous, server_round, error):
    with pytest.raises(error):
        committee_seed(previous, server_round)


# ----- draw_weighted_without_replacement ------------------------------------------------
def test_single_draw_frequencies_match_stakes():
    ids = ["a", "b", "c", "d", "e"]
    stakes = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    rng = np.random.default_rng(2024)
    draws = 20_000
    counts = dict.fromkeys(ids, 0)
    for _ in range(draws):
        (chosen,) = draw_weighted_without_replacement(ids, stakes, 1, rng)
        counts[chosen] += 1
    observed = np.array([counts[i] for i in ids])
    expected = draws * stakes / stakes.sum()
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    assert statistic < stats.chi2.ppf(1 - ALPHA, df=len(ids) - 1)


def test_ordered_samples_follow_successive_sampling():
    ids = ["a", "b", "c", "d", "e"]
    stakes = [1.0, 2.0, 3.0, 4.0, 10.0]
    k, draws = 3, 30_000
    exact = successive_sampling_probabilities(stakes, k)
    rng = np.random.default_rng(7)
    counts = dict.fromkeys(exact, 0)
    for _ in range(draws):
        sample = draw_weighted_without_replacement(ids, stakes, k, rng)
        counts[tuple(ids.index(i) for i in sample)] += 1
    observed = np.array([counts[s] for s in exact])
    expected = draws * np.array([exact[s] for s in exact])
    assert expected.min() >= 5  # the chi-square approximation is valid
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    assert statistic < stats.chi2.ppf(1 - ALPHA, df=len(exact) - 1)

    # Inclusion probabilities (the quantity a committee member cares about) as well.
    draws_in = {i: sum(c for s, c in counts.items() if i in s) for i in range(len(ids))}
    for i in range(len(ids)):
        p = sum(prob for s, prob in exact.items() if i in s)
        bound = 4.0 * math.sqrt(p * (1 - p) / draws)
        assert abs(draws_in[i] / draws - p) < bound
    # Inclusion is not proportional to stake once k > 1: the heaviest id is capped at 1.
    assert sum(prob for s, prob in exact.items() if 4 in s) < 1.0


def test_zero_stake_is_never_drawn():
    rng = np.random.default_rng(0)
    for _ in range(500):
        drawn = draw_weighted_without_replacement(["a", "b", "c"], [0.0, 1.0, 1.0], 2, rng)
        assert sorted(drawn) == ["b", "c"]


def test_draw_clamps_and_warns_when_too_few_eligible(caplog):
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING):
        drawn = draw_weighted_without_replacement(["a", "b", "c"], [1.0, 0.0, 2.0], 5, rng)
    assert sorted(drawn) == ["a", "c"]
    assert "clamped" in caplog.text


def test_draw_of_zero_returns_empty_and_consumes_one_uniform_per_id():
    rng = np.random.default_rng(11)
    reference = np.random.default_rng(11)
    assert draw_weighted_without_replacement(["a", "b"], [1.0, 1.0], 0, rng) == []
    reference.random(2)
    assert rng.random() == reference.random()


def test_draw_is_reproducible_from_uniforms():
    ids = [f"n{i}" for i in range(20)]
    stakes = np.arange(1.0, 21.0)
    first = draw_weighted_without_replacement(ids, stakes, 5, np.random.default_rng(5))
    second = draw_weighted_without_replacement(ids, stakes, 5, np.random.default_rng(5))
    assert first == second
    assert len(set(first)) == 5


@pytest.mark.parametrize(
    ("ids", "stakes", "k", "error"),
    [
        (["a", "b"], [1.0], 1, ValueError),
        (["a", "b"], [1.0, -1.0], 1, ValueError),
        (["a", "b"], [1.0, float("nan")], 1, ValueError),
        (["a", "b"], [1.0, float("inf")], 1, ValueError),
        (["a", "a"], [1.0, 1.0], 1, ValueError),
        (["a", 2], [1.0, 1.0], 1, TypeError),
        (["a", "b"], [1.0, 1.0], -1, ValueError),
        (["a", "b"], [1.0, 1.0], 1.5, ValueError),
    ],
)
def test_draw_rejects_bad_input(ids, stakes, k, error):
    with pytest.raises(error):
        draw_weighted_without_replacement(ids, stakes, k, np.random.default_rng(0))


def test_draw_requires_a_generator():
    with pytest.raises(TypeError, match="Generator"):
        draw_weighted_without_replacement(["a"], [1.0], 1, np.random.RandomState(0))


# ----- draw_committee -------------------------------------------------------------------
def make_stakes(n=10):
    return {str(i): float(i + 1) for i in range(n)}


def equal_stakes(ids, stake=1.0):
    return dict.fromkeys(ids, stake)


def test_same_seed_same_committee_regardless_of_candidate_order():
    stakes = make_stakes()
    candidates = [str(i) for i in range(10)]
    first = draw_committee(stakes, candidates, 4, 3, HASH, 5)
    second = draw_committee(stakes, list(reversed(candidates)), 4, 3, HASH.hex(), 5)
    assert first == second
    assert len(set(first.validators)) == 4
    assert len(set(first.miners)) == 3
    assert first.seed == committee_seed(HASH, 5)


def test_stake_mapping_order_does_not_matter():
    stakes = make_stakes()
    shuffled = dict(reversed(list(stakes.items())))
    candidates = [str(i) for i in range(10)]
    assert draw_committee(stakes, candidates, 4, 3, HASH, 2) == draw_committee(
        shuffled, candidates, 4, 3, HASH, 2
    )


def test_a_stake_ledger_snapshot_draws_like_its_mapping():
    from bcsfl_flower.round.stakes import StakeLedger

    stakes = make_stakes()
    ledger = StakeLedger(stakes)
    candidates = ["3", "1", "7", "0"]
    assert draw_committee(ledger.as_dict(), candidates, 2, 2, HASH, 4) == draw_committee(
        stakes, candidates, 2, 2, HASH, 4
    )


def test_candidates_without_a_stake_entry_are_an_error_even_if_others_have_one():
    with pytest.raises(KeyError, match="'42'"):
        draw_committee(make_stakes(), ["1", "42"], 1, 1, HASH, 1)


def test_committee_can_be_replayed_from_chain_data():
    stakes = make_stakes()
    candidates = ["3", "1", "7", "0", "9", "4"]
    committee = draw_committee(stakes, candidates, 3, 2, HASH, 9)
    # An auditor's replay, following the documented steps.
    ordered = sorted(candidates)
    rng = np.random.default_rng(committee_seed(HASH, 9))
    weights = [stakes[i] for i in ordered]
    assert committee.validators == tuple(
        draw_weighted_without_replacement(ordered, weights, 3, rng)
    )
    assert committee.miners == tuple(draw_weighted_without_replacement(ordered, weights, 2, rng))


def test_only_the_candidates_stakes_matter():
    stakes = make_stakes()
    candidates = ["2", "5", "8"]
    richer = {**stakes, "0": 1e9, "1": 1e9}  # stakes of non-candidates change nothing
    assert draw_committee(stakes, candidates, 2, 2, HASH, 3) == draw_committee(
        richer, candidates, 2, 2, HASH, 3
    )


def test_different_rounds_and_hashes_give_different_committees():
    candidates = [str(i) for i in range(20)]
    stakes = equal_stakes(candidates)
    by_round = {draw_committee(stakes, candidates, 3, 3, HASH, r).validators for r in range(30)}
    assert len(by_round) > 20  # 1140 possible sets; collisions are rare
    other = hashlib.sha256(b"another model").digest()
    by_hash = {
        draw_committee(stakes, candidates, 3, 3, h, 1).validators
        for h in (HASH, other, bytes(32), b"\x01" * 32)
    }
    assert len(by_hash) > 1


def test_first_validator_over_rounds_follows_stake():
    stakes = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 6.0}
    rounds = 4_000
    counts = dict.fromkeys(stakes, 0)
    for server_round in range(1, rounds + 1):
        committee = draw_committee(stakes, list(stakes), 1, 1, HASH, server_round)
        counts[committee.validators[0]] += 1
    expected = rounds * np.array(list(stakes.values())) / sum(stakes.values())
    observed = np.array([counts[i] for i in stakes])
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    assert statistic < stats.chi2.ppf(1 - ALPHA, df=len(stakes) - 1)


def test_roles_are_drawn_independently_and_may_overlap():
    committee = draw_committee(make_stakes(3), ["0", "1", "2"], 3, 3, HASH, 1)
    assert sorted(committee.validators) == ["0", "1", "2"]
    assert sorted(committee.miners) == ["0", "1", "2"]
    assert sorted(committee.members) == ["0", "1", "2"]


def test_committee_is_clamped_to_live_candidates(caplog):
    with caplog.at_level(logging.WARNING):
        committee = draw_committee(make_stakes(10), ["2", "5"], 4, 1, HASH, 1)
    assert sorted(committee.validators) == ["2", "5"]
    assert len(committee.miners) == 1
    assert committee.miners[0] in {"2", "5"}
    assert "clamped" in caplog.text


def test_zero_stake_is_never_drawn_but_positive_stake_is():
    slashed = {"a": 0.0, "b": 1.0, "c": 1.0}
    for server_round in range(1, 50):
        committee = draw_committee(slashed, ["a", "b", "c"], 2, 2, HASH, server_round)
        assert "a" not in committee.members
    recovered = {**slashed, "a": 1.0}
    assert any(
        "a" in draw_committee(recovered, ["a", "b", "c"], 1, 1, HASH, r).members for r in range(50)
    )


def test_committee_to_dict():
    committee = Committee(server_round=2, seed=255, validators=("a", "b"), miners=("b",))
    record = committee.to_dict()
    assert record == {
        "server_round": 2,
        "seed": "0x" + "0" * 62 + "ff",
        "validators": ["a", "b"],
        "miners": ["b"],
    }
    assert committee.members == ("a", "b")
