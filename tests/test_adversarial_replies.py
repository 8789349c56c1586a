"""1000+ malformed or adversarial train replies, one per round among an honest majority.

Each round of a federation has eight honest clients and one adversarial reply, fed
through the public Strategy API (``configure_train`` then ``aggregate_train``) to a
BCSFL with the default settings. Across every round the test requires:

* no exception escapes the strategy;
* no round rolls back (each has exactly one bad reply, so a rollback would be caused by
  that one reply);
* no committed model is dominated by the bad reply: the committed step stays within
  half an honest step of the honest clients' mean, and, when the bad reply's step is
  poisoned (more than an honest step away from that mean), closer to the mean than to
  the poison.

Every bad reply comes from a fresh node id, so it always starts with a full stake (a
Sybil that cannot be remembered). The grid is a fake whose validators score a model by
its squared distance to a far target; honest clients step towards it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from flower_messages import FakeGrid, error_reply, train_reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from bcsfl_flower.strategy import BCSFL

DIM = 64
TARGET = 100 * np.random.default_rng(7).normal(size=DIM).astype(np.float32)
HONEST = 8
STEP = 4.0
ROUNDS_PER_FEDERATION = 50
FEDERATIONS = 21  # 21 x 50 = 1050 adversarial replies

Attack = Callable[[np.random.Generator, np.ndarray, np.ndarray], object]
"""``(rng, global weights, an honest update) -> reply Message`` from the bad node."""

BAD_NODE = 1000
"""Node id of the round's bad reply; a fresh identity (with a fresh stake) every round."""


def reply(weights, num_examples=100, **metrics):
    return train_reply(BAD_NODE, {"w": np.asarray(weights)}, num_examples=num_examples, **metrics)


def with_content(message, mutate):
    mutate(message.content)
    return message


def scaled(rng, w, h):
    return reply((w + 10.0 ** rng.integers(1, 7) * rng.choice([-1.0, 1.0]) * h).astype(np.float32))


def near_max(rng, w, h):
    values = (w + h).astype(np.float32)
    index = rng.choice(DIM, size=rng.integers(1, DIM), replace=False)
    values[index] = rng.choice([-1.0, 1.0], size=index.size) * np.float32(3.4e38)
    return reply(values)


def with_nonfinite(value):
    def attack(rng, w, h):
        values = (w + h).astype(np.float32)
        values[rng.integers(DIM)] = value
        return reply(values)

    return attack


def garbled(data: Callable[[bytes], bytes]) -> Attack:
    """A reply whose array declares the right dtype and shape over unreadable bytes."""

    def attack(rng, w, h):
        good = Array((w + h).astype(np.float32))
        bytes_ = data(good.data)
        bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=bytes_)
        return with_content(
            reply(w + h), lambda c: c.__setitem__("arrays", ArrayRecord({"w": bad}))
        )

    return attack


def counted(count, step=1.0):
    def attack(rng, w, h):
        return reply((w + step * h).astype(np.float32), num_examples=count)

    return attack


ATTACKS: dict[str, Attack] = {
    "error reply": lambda rng, w, h: error_reply(BAD_NODE, "ClientApp exploded"),
    "no ArrayRecord": lambda rng, w, h: with_content(reply(w + h), lambda c: c.pop("arrays")),
    "no MetricRecord": lambda rng, w, h: with_content(reply(w + h), lambda c: c.pop("metrics")),
    "two ArrayRecords": lambda rng, w, h: with_content(
        reply(w + h), lambda c: c.__setitem__("more", ArrayRecord({"w": Array(w)}))
    ),
    "two MetricRecords": lambda rng, w, h: with_content(
        reply(w + h), lambda c: c.__setitem__("more", MetricRecord({"x": 1.0}))
    ),
    "missing key": lambda rng, w, h: train_reply(BAD_NODE, {"v": w + h}, 100),
    "extra key": lambda rng, w, h: train_reply(
        BAD_NODE, {"w": w + h, "x": np.ones(3, np.float32)}, 100
    ),
    "longer shape": lambda rng, w, h: reply(np.zeros(DIM + 1, np.float32)),
    "shorter shape": lambda rng, w, h: reply(np.zeros(DIM - 1, np.float32)),
    "2-D shape": lambda rng, w, h: reply(np.zeros((8, DIM // 8), np.float32)),
    "float64": lambda rng, w, h: reply((w + h).astype(np.float64)),
    "float16": lambda rng, w, h: reply((w + h).astype(np.float16)),
    "int32": lambda rng, w, h: reply((w + h).astype(np.int32)),
    "NaN value": with_nonfinite(np.nan),
    "inf value": with_nonfinite(np.inf),
    "-inf value": with_nonfinite(-np.inf),
    "near-max floats": near_max,
    "scaled up to 1e6": scaled,
    "zero update": lambda rng, w, h: reply(w.copy()),
    "noise x100": lambda rng, w, h: reply((w + 100 * rng.normal(size=DIM)).astype(np.float32)),
    "sign flip x10": lambda rng, w, h: reply((w - 10 * h).astype(np.float32)),
    "garbage array bytes": garbled(lambda data: b"\x93NUMPY garbage"),
    "truncated array bytes": garbled(lambda data: data[:-9]),
    "array header claiming more elements": garbled(lambda data: data.replace(b"(64,)", b"(99,)")),
    "zero examples": counted(0),
    "negative examples": counted(-5),
    "NaN examples": counted(float("nan")),
    "inf examples": counted(float("inf")),
    "list examples": counted([100, 100]),
    "1e300 examples, honest step": counted(1e300),
    "1e300 examples, poisoned step": counted(1e300, step=-3.0),
    "1e12 examples, poisoned step": counted(1e12, step=-1.0),
    "NaN metric": lambda rng, w, h: reply(w + h, train_loss=float("nan")),
    "list metric of odd length": lambda rng, w, h: reply(w + h, train_loss=[1.0, 2.0, 3.0]),
}


def honest_replies(rng, weights):
    """Honest clients step about STEP towards the (far) target, with some noise."""
    direction = (TARGET - weights) / np.linalg.norm(TARGET - weights)
    steps = []
    messages = []
    for node in range(1, HONEST + 1):
        step = STEP * direction * rng.uniform(0.8, 1.2) + 0.05 * rng.normal(size=DIM)
        step = step.astype(np.float32)
        steps.append(step)
        messages.append(train_reply(node, {"w": weights + step}, 100, train_loss=0.5))
    return messages, np.mean(steps, axis=0), steps[0]


def squared_distance(node, arrays):
    return float(np.sum((arrays["w"].numpy().astype(np.float64) - TARGET) ** 2))


def bad_step(message, weights):
    """The bad reply's step ``w_k - w_t`` when it carries a decodable model, else None."""
    if message.has_error() or "arrays" not in message.content.array_records:
        return None
    record = message.content["arrays"]
    if "w" not in record or record["w"].shape != (DIM,):
        return None
    try:
        model = record["w"].numpy()
    except ValueError:  # garbled bytes
        return None
    with np.errstate(all="ignore"):
        return model.astype(np.float64) - weights


def test_a_thousand_adversarial_replies_never_crash_stall_or_dominate_a_round():
    names = sorted(ATTACKS)
    outcomes: Counter[str] = Counter()
    failures = []
    for federation in range(FEDERATIONS):
        rng = np.random.default_rng(federation)
        strategy = BCSFL()
        weights = np.zeros(DIM, np.float32)
        for server_round in range(1, ROUNDS_PER_FEDERATION + 1):
            name = names[(federation * ROUNDS_PER_FEDERATION + server_round) % len(names)]
            messages, honest_mean, honest_step = honest_replies(rng, weights)
            bad = ATTACKS[name](rng, weights, honest_step)
            if not bad.has_error():
                bad.metadata.__dict__["_src_node_id"] = BAD_NODE + server_round
            messages.insert(int(rng.integers(0, HONEST + 1)), bad)
            global_arrays = ArrayRecord({"w": Array(weights)})
            grid = FakeGrid(squared_distance)
            grid.get_node_ids = lambda: list(range(1, HONEST + 2))
            list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), grid))
            try:
                arrays, metrics = strategy.aggregate_train(server_round, messages)
            except Exception as err:  # any exception is a failure here
                failures.append(f"{name}: raised {type(err).__name__}: {err}")
                continue
            outcomes[name] += 1
            if metrics["bcsfl-committed"] != 1:
                failures.append(f"{name}: round {server_round} rolled back")
                continue
            step = arrays["w"].numpy().astype(np.float64) - weights
            gap = np.linalg.norm(step - honest_mean)
            if gap > 0.5 * np.linalg.norm(honest_mean):
                failures.append(f"{name}: committed step {gap:.3g} away from the honest mean")
            poison = bad_step(bad, weights)
            poisoned = (
                poison is not None
                and np.all(np.isfinite(poison))
                and np.linalg.norm(poison - honest_mean) > STEP
            )
            if poisoned and np.linalg.norm(step - poison) < gap:
                failures.append(f"{name}: committed step is closer to the bad reply")
            weights = arrays["w"].numpy()
    assert sum(outcomes.values()) + len(failures) >= 1000
    assert set(outcomes) == set(ATTACKS)
    assert not failures, failures[:20]
