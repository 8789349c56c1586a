"""Each kind of bad train reply is rejected on its own, and the round goes on."""

import numpy as np
import pytest
from flower_messages import FakeGrid, error_reply, train_reply
from flwr.app import Array, ArrayRecord

from bcsfl_flower.replies import AcceptedReply, RejectedReply, ReplyChecker
from bcsfl_flower.strategy import BCSFL

GLOBAL = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}


def reference() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def good(node_id: int, value: float = 1.0, num_examples: int = 10):
    return train_reply(
        node_id,
        {k: np.full_like(v, value) for k, v in GLOBAL.items()},
        num_examples=num_examples,
        train_loss=0.5,
    )


def check(message):
    return ReplyChecker(reference()).check(message)


def test_good_reply_is_accepted():
    outcome = check(good(7, num_examples=12))
    assert isinstance(outcome, AcceptedReply)
    assert outcome.node_id == 7 and outcome.num_examples == 12.0


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (error_reply(1, "ClientApp crashed"), "error reply: ClientApp crashed"),
        (train_reply(1, {"conv.weight": GLOBAL["conv.weight"]}), "missing keys ['fc.bias']"),
        (train_reply(1, {**GLOBAL, "extra": np.zeros(1, np.float32)}), "unexpected keys ['extra']"),
        (train_reply(1, {**GLOBAL, "fc.bias": np.zeros(5, np.float32)}), "'fc.bias' is float32[5]"),
        (train_reply(1, {**GLOBAL, "fc.bias": np.zeros(4, np.float64)}), "expected float32[4]"),
        (train_reply(1, {**GLOBAL, "fc.bias": np.array([0, np.nan, 0, 0], np.float32)}), "NaN"),
        (train_reply(1, {**GLOBAL, "fc.bias": np.array([np.inf, 0, 0, 0], np.float32)}), "NaN"),
        (train_reply(1, GLOBAL, num_examples=0), "must be a finite number > 0"),
        (train_reply(1, GLOBAL, num_examples=-3), "must be a finite number > 0"),
        (train_reply(1, GLOBAL, num_examples=float("nan")), "must be a finite number > 0"),
        (train_reply(1, GLOBAL, num_examples=[1, 2]), "must be a finite number > 0"),
    ],
    ids=[
        "error",
        "missing",
        "extra",
        "shape",
        "dtype",
        "nan",
        "inf",
        "zero",
        "negative",
        "nan-weight",
        "list-weight",
    ],
)
def test_bad_reply_is_rejected_with_reason(message, fragment):
    outcome = check(message)
    assert isinstance(outcome, RejectedReply)
    assert fragment in outcome.reason


def test_missing_num_examples_is_rejected():
    message = train_reply(1, GLOBAL)
    del message.content["metrics"]["num-examples"]
    outcome = check(message)
    assert isinstance(outcome, RejectedReply)
    assert "'num-examples' is missing" in outcome.reason


def test_round_with_one_bad_reply_completes_with_the_good_ones():
    records = []
    strategy = BCSFL(num_validators=2, round_sink=lambda rnd, rec: records.append((rnd, rec)))
    strategy._global_arrays = reference()  # what configure_train stores
    strategy._grid = FakeGrid(lambda node, arrays: 0.0)  # every validator accepts
    replies = [
        good(1, value=1.0, num_examples=10),
        good(2, value=3.0, num_examples=30),
        train_reply(3, {**GLOBAL, "fc.bias": np.full(4, np.nan, np.float32)}),
        error_reply(4, "timeout"),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # Sample-weighted mean of the two good replies: (1*10 + 3*30) / 40 = 2.5
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), np.full((2, 3), 2.5))
    assert metrics["train_loss"] == pytest.approx(0.5)
    assert metrics["committed"] == 1
    ((rnd, record),) = records
    assert rnd == 1
    assert record["trusted"] == ["1", "2"]
    assert set(record["rejected"]) == {"3", "4"}
    assert "NaN" in record["rejected"]["3"]


def test_round_with_only_bad_replies_keeps_the_previous_model():
    strategy = BCSFL()
    strategy._global_arrays = reference()
    strategy._grid = FakeGrid(lambda node, arrays: 0.0)
    arrays, metrics = strategy.aggregate_train(1, [error_reply(1, "x")])
    assert arrays is strategy._global_arrays
    assert metrics["committed"] == 0
