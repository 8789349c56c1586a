"""The check stage: each kind of bad train reply is rejected on its own, with a reason."""

import numpy as np
import pytest
from flower_messages import error_reply, train_reply
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from bcsfl_flower.round.checks import PacketCheck, check_replies
from bcsfl_flower.round.plain import PlainSpace

GLOBAL = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}


def reference() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def good(node_id: int, value: float = 1.0, num_examples: object = 10):
    return train_reply(
        node_id,
        {k: np.full_like(v, value) for k, v in GLOBAL.items()},
        num_examples=num_examples,
        train_loss=0.5,
    )


def check(messages, gate=None):
    messages = list(messages)
    collector = PlainSpace().collector(reference(), len(messages))
    return check_replies(messages, collector, "num-examples", 1, gate)


def test_good_replies_are_accepted_in_order_with_their_updates():
    checked = check([good(7, 1.0, 12), good(3, 2.0, 30)])
    assert [c.node_id for c in checked.accepted] == [7, 3]
    assert [c.num_examples for c in checked.accepted] == [12.0, 30.0]
    assert checked.rejected == {}
    # Ten parameters of value 1 and 2: norms sqrt(10) and 2 sqrt(10).
    np.testing.assert_allclose(checked.batch.norms, [np.sqrt(10), 2 * np.sqrt(10)], rtol=1e-6)


def nan_bias():
    return {**GLOBAL, "fc.bias": np.array([0, np.nan, 0, 0], np.float32)}


def two_array_records():
    message = good(1)
    message.content["second"] = ArrayRecord({"x": Array(np.zeros(1, np.float32))})
    return message


def nan_metric():
    message = good(1)
    message.content["metrics"]["train_loss"] = float("nan")
    return message


BAD = {
    "error": (error_reply(1, "ClientApp crashed"), "error reply: ClientApp crashed"),
    "missing": (train_reply(1, {"conv.weight": GLOBAL["conv.weight"]}), "missing keys ['fc.bias']"),
    "extra": (train_reply(1, {**GLOBAL, "x": np.zeros(1, np.float32)}), "unexpected keys ['x']"),
    "shape": (train_reply(1, {**GLOBAL, "fc.bias": np.zeros(5, np.float32)}), "float32[5]"),
    "dtype": (
        train_reply(1, {**GLOBAL, "fc.bias": np.zeros(4, np.float64)}),
        "expected float32[4]",
    ),
    "nan": (train_reply(1, nan_bias()), "'fc.bias' contains NaN or infinite values"),
    "inf": (
        train_reply(1, {**GLOBAL, "fc.bias": np.array([np.inf, 0, 0, 0], np.float32)}),
        "contains NaN or infinite",
    ),
    "zero-weight": (train_reply(1, GLOBAL, num_examples=0), "must be a finite number > 0"),
    "negative-weight": (train_reply(1, GLOBAL, num_examples=-3), "must be a finite number > 0"),
    "nan-weight": (train_reply(1, GLOBAL, num_examples=float("nan")), "finite number > 0"),
    "inf-weight": (train_reply(1, GLOBAL, num_examples=float("inf")), "finite number > 0"),
    "list-weight": (train_reply(1, GLOBAL, num_examples=[1, 2]), "finite number > 0"),
    "two-array-records": (two_array_records(), "exactly one ArrayRecord and one MetricRecord"),
    "nan-metric": (nan_metric(), "metric 'train_loss' is not finite"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_reply_is_rejected_with_a_reason_and_the_good_one_kept(name):
    message, fragment = BAD[name]
    checked = check([message, good(2)])
    assert [c.node_id for c in checked.accepted] == [2]
    assert fragment in checked.rejected["1"]
    assert checked.batch.size == 1


def test_missing_example_count_and_missing_records_are_rejected():
    no_count = train_reply(1, GLOBAL)
    del no_count.content["metrics"]["num-examples"]
    arrays_only = train_reply(2, GLOBAL)
    del arrays_only.content["metrics"]
    checked = check([no_count, arrays_only])
    assert "'num-examples' is missing" in checked.rejected["1"]
    assert "one MetricRecord" in checked.rejected["2"]


def test_values_whose_update_overflows_float32_are_rejected():
    huge = {**GLOBAL, "fc.bias": np.full(4, 3.0e38, np.float32)}
    base = ArrayRecord({**{k: Array(v) for k, v in GLOBAL.items()}})
    base["fc.bias"] = Array(np.full(4, -3.0e38, np.float32))
    collector = PlainSpace().collector(base, 1)
    checked = check_replies([train_reply(1, huge)], collector, "num-examples", 1)
    assert "'fc.bias' minus the global model overflows float32" in checked.rejected["1"]


def test_near_max_finite_values_are_accepted_with_a_finite_norm():
    huge = {**GLOBAL, "fc.bias": np.full(4, 3.0e38, np.float32)}
    checked = check([train_reply(1, huge)])
    assert checked.accepted and np.isfinite(checked.batch.norms[0])
    assert checked.batch.norms[0] == pytest.approx(6.0e38, rel=1e-6)


def test_a_second_reply_from_the_same_node_is_ignored():
    checked = check([good(1, 1.0), good(1, 5.0)])
    assert len(checked.accepted) == 1
    np.testing.assert_allclose(checked.batch.norms, [np.sqrt(10)], rtol=1e-6)


def test_packet_gate_rejects_and_attaches_packets():
    signed = object()

    def gate(node, content, server_round):
        assert server_round == 1 and isinstance(content, RecordDict)
        if node == 1:
            return PacketCheck(rejection="packet rejected: bad-signature")
        return PacketCheck(packet=signed if node == 2 else None)

    checked = check([good(1), good(2), good(3)], gate)
    assert checked.rejected == {"1": "packet rejected: bad-signature"}
    assert [c.packet for c in checked.accepted] == [signed, None]


def test_a_metric_record_with_lists_is_accepted_when_finite():
    message = good(1)
    message.content["metrics"] = MetricRecord({"num-examples": 3, "per-class": [0.1, 0.2]})
    assert check([message]).accepted
