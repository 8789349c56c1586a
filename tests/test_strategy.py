"""The BCSFL round: screening, committee validation, 2/3 consensus and rollback.

The grid is a fake that answers the validators' evaluate messages in-process; the
loss of a model on a validator is its squared distance to a target model, so a
candidate that moves toward the target lowers the loss.
"""

import numpy as np
import pytest
from flower_messages import FakeGrid, train_reply
from flwr.app import Array, ArrayRecord

from bcsfl_flower.strategy import BCSFL

DIM = 200
# Synthetic updates separate cleanly in raw cosine, so these tests screen with the
# paper's raw mode; the median-centred default is calibrated on real MNIST updates.
RAW = {"screening_centering": "none", "cosine_threshold": 0.3}
TARGET = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
GLOBAL = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})


def squared_distance(node, arrays):
    return float(np.sum((arrays["w"].numpy() - TARGET) ** 2))


def federation(num_honest=7, num_attackers=3, seed=1):
    """Honest updates point at TARGET with heterogeneity; attackers point away."""
    rng = np.random.default_rng(seed)
    replies, attackers = [], set()
    for node in range(1, num_honest + num_attackers + 1):
        noise = rng.normal(scale=0.4, size=DIM)
        if node > num_honest:
            attackers.add(str(node))
            update = -0.5 * TARGET + noise
        else:
            update = 0.5 * TARGET * rng.uniform(0.5, 1.5) + noise
        replies.append(train_reply(node, {"w": update.astype(np.float32)}, num_examples=100))
    return replies, attackers


def run_round(strategy, replies, grid, server_round=1):
    strategy._global_arrays, strategy._grid = GLOBAL, grid
    records = []
    strategy.round_sink = lambda rnd, rec: records.append(rec)
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays, metrics, records[0]


def test_trusted_mean_rejects_attackers_and_commits_the_honest_mean():
    replies, attackers = federation()
    arrays, metrics, record = run_round(BCSFL(**RAW), replies, FakeGrid(squared_distance))
    assert set(record["rejected"]) == attackers
    assert record["outcome"] == "commit" and metrics["committed"] == 1
    honest = np.mean([r.content["arrays"]["w"].numpy() for r in replies[:7]], axis=0)
    np.testing.assert_allclose(arrays["w"].numpy(), honest, rtol=1e-5, atol=1e-6)
    # Validators are drawn among trusted clients only, by stake.
    assert set(record["committee"]["validators"]).isdisjoint(attackers)
    assert len(record["committee"]["validators"]) == 5
    # Stakes: trusted rewarded, rejected slashed.
    assert all(record["stakes"][a] == 0.5 for a in attackers)
    assert all(record["stakes"][str(n)] == pytest.approx(1.1) for n in range(1, 8))


def test_without_quorum_the_round_rolls_back_to_the_previous_model():
    replies, _ = federation()

    # Validators 1..3 say the candidate is much worse; with 5 validators the quorum is 4.
    def loss(node, arrays):
        worse = arrays["w"].numpy().any() and node in {1, 2, 3}
        return squared_distance(node, arrays) + (1e6 if worse else 0.0)

    strategy = BCSFL(num_validators=7, **RAW)
    arrays, metrics, record = run_round(strategy, replies, FakeGrid(loss))
    assert arrays is GLOBAL
    assert record["outcome"] == "rollback" and metrics["committed"] == 0
    assert record["quorum"] == 5 and record["votes_for"] == 4
    assert "rollback" in record["reason"]


def test_silent_and_failing_validators_count_against_the_quorum():
    replies, _ = federation(num_honest=6, num_attackers=0)

    def loss(node, arrays):
        return None if node == 1 else squared_distance(node, arrays)

    strategy = BCSFL(num_validators=6, **RAW)
    arrays, _, record = run_round(strategy, replies, FakeGrid(loss, silent={2, 3}))
    # 6 validators, quorum 4: only 3 can vote (1 errors, 2 and 3 are silent).
    assert record["outcome"] == "rollback"
    assert "1" in record["validator_problems"]
    assert arrays is GLOBAL


def test_paper_selection_commits_the_single_best_local_model():
    replies, attackers = federation()
    strategy = BCSFL(selection="paper", **RAW)
    arrays, _, record = run_round(strategy, replies, FakeGrid(squared_distance))
    assert record["outcome"] == "commit"
    winner = record["candidate"]
    assert winner not in attackers
    local = {str(r.metadata.src_node_id): r.content["arrays"]["w"].numpy() for r in replies}
    best = min(
        (n for n in local if n not in attackers),
        key=lambda n: np.sum((local[n] - TARGET) ** 2),
    )
    assert winner == best
    np.testing.assert_array_equal(arrays["w"].numpy(), local[best])


def test_paper_selection_rolls_back_when_validators_disagree():
    replies, attackers = federation()
    honest = [str(n) for n in range(1, 8)]

    # Each validator prefers a different local model: its own.
    def loss(node, arrays):
        own = next(r for r in replies if r.metadata.src_node_id == node)
        return float(np.sum((arrays["w"].numpy() - own.content["arrays"]["w"].numpy()) ** 2))

    strategy = BCSFL(selection="paper", **RAW)
    arrays, _, record = run_round(strategy, replies, FakeGrid(loss))
    assert record["outcome"] == "rollback"
    assert arrays is GLOBAL
    assert set(record["votes"].values()) <= set(honest)


def test_committee_is_reproducible_from_the_previous_hash_and_round():
    replies, _ = federation()
    _, _, first = run_round(BCSFL(**RAW), replies, FakeGrid(squared_distance))
    _, _, again = run_round(BCSFL(**RAW), replies, FakeGrid(squared_distance))
    _, _, later = run_round(BCSFL(**RAW), replies, FakeGrid(squared_distance), server_round=2)
    assert first["committee"] == again["committee"]
    assert first["committee"]["seed"] != later["committee"]["seed"]


def test_data_size_stakes_and_validation_of_arguments():
    replies, _ = federation(num_attackers=0)
    strategy = BCSFL(initial_stake="data-size", stake_reward=0.0, **RAW)
    _, _, record = run_round(strategy, replies, FakeGrid(squared_distance))
    assert set(record["stakes"].values()) == {100.0}
    with pytest.raises(ValueError, match="selection"):
        BCSFL(selection="best")
    with pytest.raises(ValueError, match="cosine_threshold"):
        BCSFL(cosine_threshold=2.0)
