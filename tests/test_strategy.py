"""The BCSFL strategy through Flower's Strategy API: rounds, rollbacks, stake, FedAvg arguments.

The grid is a fake that answers the validators' evaluate messages in-process; the loss
of a model on a validator is its squared distance to a target model, so a candidate
that moves toward the target lowers the loss.
"""

import numpy as np
import pytest
from flower_messages import FakeGrid, error_reply, reply_to, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from bcsfl_flower.protocol import BUDGET_REFUSAL, DUTY_CAPABLE_RECORD_KEY, DUTY_RECORD_KEY
from bcsfl_flower.round.settings import SettingError
from bcsfl_flower.strategy import BCSFL, PrivacyBudgetExhaustedError

DIM = 200
TARGET = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
GLOBAL = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})


def squared_distance(node, arrays):
    return float(np.sum((arrays["w"].numpy() - TARGET) ** 2))


def federation(num_honest=7, num_attackers=3, seed=1, num_examples=100):
    """Honest updates point at TARGET with heterogeneity; attackers point away."""
    rng = np.random.default_rng(seed)
    replies, attackers = [], set()
    for node in range(1, num_honest + num_attackers + 1):
        noise = rng.normal(scale=0.4, size=DIM)
        if node > num_honest:
            attackers.add(str(node))
            update = -0.5 * TARGET + noise
        else:
            update = 0.5 * TARGET * rng.uniform(0.8, 1.2) + noise
        replies.append(
            train_reply(node, {"w": update.astype(np.float32)}, num_examples, train_loss=0.1 * node)
        )
    return replies, attackers


def run_round(strategy, replies, grid, server_round=1, global_arrays=GLOBAL):
    """Configure (as Flower does) and aggregate one round; return arrays, metrics, record."""
    records = []
    strategy.round_sink = lambda rnd, rec: records.append(rec)
    grid.get_node_ids = lambda: [r.metadata.src_node_id for r in replies]
    list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return arrays, metrics, records[0]


def honest_mean(replies, attackers):
    return np.mean(
        [
            r.content["arrays"]["w"].numpy()
            for r in replies
            if str(r.metadata.src_node_id) not in attackers
        ],
        axis=0,
    )


def test_attackers_are_rejected_and_a_candidate_of_the_honest_clients_commits():
    replies, attackers = federation()
    arrays, metrics, record = run_round(BCSFL(), replies, FakeGrid(squared_distance))
    assert set(record["rejected"]) == attackers
    assert record["outcome"] == "commit" and metrics["bcsfl-committed"] == 1
    assert record["candidates"] == [
        "trusted-mean",
        "core-mean",
        "geometric-median",
        "trusted-half-step",
    ]
    assert set(record["committee"]["validators"]).isdisjoint(attackers)
    assert len(record["committee"]["validators"]) == 5
    # The committed model moved towards the target, and no attacker is in its support.
    assert squared_distance(0, arrays) < squared_distance(0, GLOBAL)
    assert set(record["rewarded"]).isdisjoint(attackers)
    # Stakes: slashed by half for the rejected, +0.05 for the supporting honest clients.
    assert all(record["stakes"][a] == 0.5 for a in attackers)
    assert all(record["stakes"][n] == pytest.approx(1.05) for n in record["rewarded"])
    assert record["stakes_before"] == {str(n): 1.0 for n in range(1, 11)}
    # Client metrics come from train_metrics_aggr_fn over the supporting clients.
    assert 0.1 <= metrics["train_loss"] <= 0.7


def test_without_quorum_the_round_rolls_back_rewards_nobody_and_slashes_suspects():
    replies, attackers = federation()

    # Validators 1..3 say every candidate is much worse; with 5 validators the quorum is 4.
    def loss(node, arrays):
        worse = arrays["w"].numpy().any() and node in {1, 2, 3}
        return squared_distance(node, arrays) + (1e6 if worse else 0.0)

    arrays, metrics, record = run_round(BCSFL(num_validators=7), replies, FakeGrid(loss))
    assert arrays is GLOBAL
    assert record["outcome"] == "rollback" and metrics["bcsfl-committed"] == 0
    assert record["quorum"] == 5 and record["votes_for"] == 4
    assert record["rewarded"] == []
    # The rollback changes the next round: the rejected and the trusted clients outside
    # the core lose stake.
    suspects = set(record["slashed"]) - attackers
    assert suspects and suspects <= set(record["trusted"])
    assert all(record["stakes"][n] == 0.5 for n in record["slashed"])


def test_silent_and_failing_validators_count_against_the_quorum():
    replies, _ = federation(num_honest=6, num_attackers=0)

    def loss(node, arrays):
        return None if node == 1 else squared_distance(node, arrays)

    arrays, _, record = run_round(BCSFL(num_validators=6), replies, FakeGrid(loss, silent={2, 3}))
    # 6 validators, quorum 4: only 3 can vote (1 errors, 2 and 3 are silent).
    assert record["outcome"] == "rollback"
    assert "1" in record["validator_problems"] and "2" in record["validator_problems"]
    assert arrays is GLOBAL


def test_paper_selection_commits_a_single_trusted_local_model():
    replies, attackers = federation()
    arrays, _, record = run_round(BCSFL(selection="paper"), replies, FakeGrid(squared_distance))
    assert record["outcome"] == "commit"
    winner = record["candidate"].removeprefix("client-")
    assert winner not in attackers and winner in record["rewarded"]
    local = next(r for r in replies if str(r.metadata.src_node_id) == winner)
    update = local.content["arrays"]["w"].numpy()
    committed = arrays["w"].numpy()
    # One local model, clipped at most to the median norm: same direction.
    cosine = committed @ update / (np.linalg.norm(committed) * np.linalg.norm(update))
    assert cosine == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(committed) <= np.linalg.norm(update) + 1e-4


def test_committee_is_reproducible_from_the_previous_hash_and_round():
    replies, _ = federation()
    _, _, first = run_round(BCSFL(), replies, FakeGrid(squared_distance))
    _, _, again = run_round(BCSFL(), replies, FakeGrid(squared_distance))
    _, _, later = run_round(BCSFL(), replies, FakeGrid(squared_distance), server_round=2)
    assert first["committee"] == again["committee"]
    assert first["committee"]["seed"] != later["committee"]["seed"]


def test_stake_is_memory_half_the_clients_attacking_with_a_third_of_the_stake_lose():
    replies, attackers = federation(num_honest=5, num_attackers=5)
    equal = BCSFL()
    _, _, record = run_round(equal, replies, FakeGrid(squared_distance))
    assert record["rejected"] == {}  # equal stakes, equal halves: nobody can be singled out
    minority = BCSFL(initial_stakes={a: 0.5 for a in attackers})
    for server_round in (1, 2, 3):
        _, _, record = run_round(minority, replies, FakeGrid(squared_distance), server_round)
        assert set(record["rejected"]) == attackers
        assert record["outcome"] == "commit"
    # The groups are equally tight, so the attackers are set apart, not proven
    # coordinated: left out by the validators, they lose a tenth of their stake a round.
    assert all(minority.ledger.stake(a) == pytest.approx(0.5 * 0.9**3) for a in attackers)


def test_a_set_apart_group_can_sit_on_the_committee_a_rejected_client_cannot():
    """The validators who judge a set-apart group must be able to hold its data."""
    replies, attackers = federation(num_honest=5, num_attackers=5)
    replies.append(train_reply(11, {"w": (40.0 * TARGET).astype(np.float32)}, 100))
    strategy = BCSFL(initial_stakes={a: 0.5 for a in attackers})
    validators = set()
    for server_round in (1, 2, 3):
        _, _, record = run_round(strategy, replies, FakeGrid(squared_distance), server_round)
        assert "norm" in record["rejected"]["11"]
        assert {k for k, why in record["rejected"].items() if "set apart" in why} == attackers
        validators |= set(record["committee"]["validators"])
    assert validators & attackers
    assert "11" not in validators


def test_one_bad_reply_cannot_stop_the_round_and_only_bad_replies_keep_the_model():
    replies, _ = federation(num_attackers=0)
    bad = [
        train_reply(90, {"w": np.full(DIM, np.nan, np.float32)}),
        error_reply(91, "timeout"),
        train_reply(92, {"v": np.zeros(DIM, np.float32)}),
    ]
    _, metrics, record = run_round(BCSFL(), replies + bad, FakeGrid(squared_distance))
    assert record["outcome"] == "commit" and set(record["rejected"]) == {"90", "91", "92"}
    assert metrics["bcsfl-committed"] == 1
    arrays, metrics, record = run_round(BCSFL(), bad, FakeGrid(squared_distance))
    assert arrays is GLOBAL and record["reason"] == "rollback: no valid reply"


def test_the_run_stops_when_every_client_refuses_for_its_privacy_budget():
    refusal = f"Exception: {BUDGET_REFUSAL}: training the 3 remaining round(s) would ..."
    refusals = [error_reply(node, refusal) for node in (90, 91, 92)]
    with pytest.raises(PrivacyBudgetExhaustedError, match="round 4: every client refused"):
        run_round(BCSFL(), refusals, FakeGrid(squared_distance), server_round=4)
    # One client refusing, or refusals beside a crash, is an ordinary rejection.
    mixed = [*refusals[:2], error_reply(93, "node crashed")]
    arrays, _, record = run_round(BCSFL(), mixed, FakeGrid(squared_distance))
    assert arrays is GLOBAL and record["reason"] == "rollback: no valid reply"


def test_a_huge_update_or_example_count_cannot_dominate_the_aggregate():
    replies, _ = federation(num_honest=8, num_attackers=0)
    honest = honest_mean(replies, set())
    poison = (-1e6 * TARGET).astype(np.float32)
    for bad in (
        train_reply(99, {"w": poison}, num_examples=100),
        train_reply(99, {"w": (-0.5 * TARGET).astype(np.float32)}, num_examples=1e300),
        train_reply(99, {"w": (0.5 * TARGET).astype(np.float32)}, num_examples=1e300),
    ):
        arrays, _, record = run_round(BCSFL(), [*replies, bad], FakeGrid(squared_distance))
        assert record["outcome"] == "commit"
        committed = arrays["w"].numpy()
        assert np.linalg.norm(committed - honest) < 0.5 * np.linalg.norm(honest)


class KeyedGrid(FakeGrid):
    """Answers evaluate messages sent under other record names than FedAvg's defaults."""

    def __init__(self, arrays_key, config_key):
        super().__init__(squared_distance)
        self.arrays_key, self.config_key = arrays_key, config_key

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"keyed-{len(self.sent)}-{number}"
            self.sent.append(message)
            assert list(message.content.array_records) == [self.arrays_key]
            assert list(message.content.config_records) == [self.config_key]
            loss = squared_distance(0, message.content[self.arrays_key])
            metrics = MetricRecord({"loss": loss, "n": 10})
            replies.append(reply_to(message, RecordDict({"metrics": metrics})))
        return replies


def test_fedavg_arguments_are_honoured():
    calls = []

    def train_metrics(records, key):
        calls.append([dict(next(iter(r.metric_records.values()))) for r in records])
        return aggregate_metricrecords(records, key)

    rng = np.random.default_rng(3)
    replies = [
        train_reply(n, {"w": (0.5 * TARGET + 0.1 * rng.normal(size=DIM)).astype(np.float32)})
        for n in range(1, 7)
    ]
    for reply in replies:
        metrics = reply.content["metrics"]
        metrics["n"] = 1e300 if reply.metadata.src_node_id == 6 else 100
        del metrics["num-examples"]
    strategy = BCSFL(
        weighted_by_key="n",
        arrayrecord_key="model",
        configrecord_key="settings",
        train_metrics_aggr_fn=train_metrics,
        loss_metric_key="loss",
    )
    grid = KeyedGrid("model", "settings")
    _, metrics, record = run_round(strategy, replies, grid, global_arrays=GLOBAL)
    assert record["outcome"] == "commit" and grid.sent
    assert calls and all(max(m["n"] for m in call) <= 200 for call in calls)  # capped weights
    assert "n" not in metrics  # Flower's aggregation leaves the weight key out


def test_aggregate_evaluate_leaves_out_replies_that_cannot_be_weighed():
    good = [
        reply_to_evaluate(n, {"num-examples": 10, "eval_loss": 0.5, "eval_acc": 0.9})
        for n in (1, 2)
    ]
    other_keys = reply_to_evaluate(3, {"num-examples": 10, "something": 1.0})
    no_weight = reply_to_evaluate(4, {"eval_loss": 0.1})
    huge = reply_to_evaluate(5, {"num-examples": 1e300, "eval_loss": 9.0, "eval_acc": 0.0})
    metrics = BCSFL().aggregate_evaluate(
        1, [*good, other_keys, no_weight, huge, error_reply(6, "x")]
    )
    # The 1e300 reply is capped at twice the median count (20 of 40 examples).
    assert metrics["eval_loss"] == pytest.approx((0.5 * 20 + 9.0 * 20) / 40)
    assert "something" not in metrics


def reply_to_evaluate(node, values):
    message = train_reply(node, {"w": np.zeros(1, np.float32)})
    message.content = RecordDict({"metrics": MetricRecord(values)})
    return message


def test_configure_hooks_add_nothing_for_plain_updates_and_summary_logs(caplog):
    strategy = BCSFL()
    grid = FakeGrid(squared_distance)
    grid.get_node_ids = lambda: [1, 2]
    messages = list(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid))
    assert len(messages) == 2
    assert set(messages[0].content["config"].keys()) == {"server-round"}
    strategy.summary()
    assert "BCSFL (plain updates)" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"selection": "best"}, "selection"),
        ({"initial_stake": "lottery"}, "initial_stake"),
        ({"num_validators": 0}, "num_validators"),
        ({"vote_tolerance": -1.0}, "vote_tolerance"),
        ({"outlier_norm_ratio": 1.0}, "outlier_norm_ratio"),
        ({"stake_slash": 1.0}, "stake_slash"),
        ({"committee_timeout": 0.0}, "committee_timeout"),
        ({"loss_metric_key": ""}, "loss_metric_key"),
        ({"selection": "paper", "ckks": True}, "selection"),
    ],
)
def test_invalid_arguments_fail_at_construction_naming_the_setting(kwargs, setting):
    with pytest.raises(SettingError) as error:
        BCSFL(**kwargs)
    assert error.value.setting == setting


def test_aggregate_train_before_configure_train_is_an_error():
    with pytest.raises(RuntimeError, match="before configure_train"):
        BCSFL().aggregate_train(1, [])


def test_a_client_that_runs_the_mod_gets_one_committee_message_even_without_a_chain():
    replies, _ = federation(num_attackers=0)
    for reply in replies[:4]:  # nodes 1-4 run the bcsfl mod (unsigned: there is no chain)
        reply.content[DUTY_CAPABLE_RECORD_KEY] = ConfigRecord({"committee-duty": True})
    plain_grid, duty_grid = FakeGrid(squared_distance), FakeGrid(squared_distance)
    plain = run_round(BCSFL(), federation(num_attackers=0)[0], plain_grid)[2]
    marked = run_round(BCSFL(), replies, duty_grid)[2]
    validators = marked["committee"]["validators"]
    duties = [m for m in duty_grid.sent if DUTY_RECORD_KEY in m.content.config_records]
    assert sorted(str(m.metadata.dst_node_id) for m in duties) == sorted(
        v for v in validators if int(v) <= 4
    )
    # A plain validator is asked for w_t and the trusted mean, which commits here.
    assert len(duty_grid.sent) == len(duties) + 2 * sum(int(v) > 4 for v in validators)
    assert len(plain_grid.sent) == 2 * len(validators)
    # One message or several, the validators report the same losses: the same decision.
    assert (marked["outcome"], marked["candidate"]) == (plain["outcome"], plain["candidate"])
    assert marked["model_hash"] == plain["model_hash"]

    def on_the_mean(record):
        return {validator: ballot["trusted-mean"] for validator, ballot in record["votes"].items()}

    assert on_the_mean(marked) == on_the_mean(plain)


def noisy_federation(signal, num_clients=10, seed=3):
    """Updates dominated by independent noise, as DP-SGD's are."""
    rng = np.random.default_rng(seed)
    return [
        train_reply(node, {"w": (signal * TARGET + rng.normal(size=DIM)).astype(np.float32)}, 100)
        for node in range(1, num_clients + 1)
    ]


def test_with_the_noise_reference_noisy_honest_rounds_commit_and_harmful_ones_do_not():
    # The mean moves 5% towards the target but carries noise that costs more than that.
    replies = noisy_federation(0.05)
    _, _, fixed = run_round(BCSFL(), replies, FakeGrid(squared_distance))
    assert fixed["outcome"] == "rollback"
    grid = FakeGrid(squared_distance)
    arrays, _, judged = run_round(BCSFL(noisy_updates=True), replies, grid)
    assert judged["outcome"] == "commit"
    assert squared_distance(0, arrays) < squared_distance(0, GLOBAL) + 25
    ballot = next(iter(judged["votes"].values()))[judged["candidate"]]
    assert ballot["tolerance"] > 10  # pure noise of this size raised the loss by ~20
    # Moving away from the target costs far more than noise of the same size: rollback.
    _, _, harmful = run_round(
        BCSFL(noisy_updates=True), noisy_federation(-0.3), FakeGrid(squared_distance)
    )
    assert harmful["outcome"] == "rollback"


def evaluations_per_validator(grid):
    counts = {}
    for message in grid.sent:
        if message.metadata.message_type == "evaluate":
            node = str(message.metadata.dst_node_id)
            counts[node] = counts.get(node, 0) + 1
    return counts


def test_a_plain_validator_scores_only_w_t_and_the_trusted_mean_when_the_mean_commits():
    replies, _ = federation(num_honest=8, num_attackers=0)
    grid = FakeGrid(squared_distance)
    _, _, record = run_round(BCSFL(), replies, grid)
    assert record["outcome"] == "commit" and record["candidate"] == "trusted-mean"
    # Four candidates were planned, but the fallbacks could not change this decision.
    assert len(record["candidates"]) == 4
    assert evaluations_per_validator(grid) == {v: 2 for v in record["committee"]["validators"]}
    assert "validator_problems" not in record


def test_the_fallbacks_are_scored_when_the_leading_candidates_miss_the_quorum():
    replies, attackers = federation(num_honest=8, num_attackers=0)
    reach = 0.75 * np.linalg.norm(honest_mean(replies, attackers))

    # Every validator refuses a full step; only the half step is short enough.
    def loss(node, arrays):
        too_long = np.linalg.norm(arrays["w"].numpy()) > reach
        return squared_distance(node, arrays) + (1e6 if too_long else 0.0)

    grid = FakeGrid(loss, silent={1})
    _, _, record = run_round(BCSFL(num_validators=6), replies, grid)
    assert record["outcome"] == "commit" and record["candidate"] == "trusted-half-step"
    validators = record["committee"]["validators"]
    # w_t and the trusted mean first, then the three fallbacks; the silent validator is
    # not asked twice.
    expected = {v: 5 for v in validators if v != "1"} | ({"1": 2} if "1" in validators else {})
    assert evaluations_per_validator(grid) == expected


def test_a_client_not_sampled_in_a_round_keeps_its_stake():
    """Cross-device sampling: stake is the whole population's memory, not the round's."""
    strategy = BCSFL()
    first, _ = federation(num_honest=6, num_attackers=2, seed=3)
    _, _, record = run_round(strategy, first, FakeGrid(squared_distance))
    settled = dict(record["stakes"])
    assert settled["7"] == settled["8"] == 0.5  # the attackers were slashed
    later = [
        train_reply(node + 10, {"w": (0.5 * TARGET).astype(np.float32)}, 100) for node in range(6)
    ]
    _, _, record = run_round(strategy, later, FakeGrid(squared_distance), server_round=2)
    assert record["outcome"] == "commit"
    assert {n: record["stakes"][n] for n in settled} == settled
    assert set(record["committee"]["validators"]) <= {str(n + 10) for n in range(6)}
