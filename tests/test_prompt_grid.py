"""PromptGrid: same contract as Flower's send_and_receive, shorter pauses."""

from __future__ import annotations

import pytest
from flower_messages import metadata, reply_to
from flwr.app import MetricRecord, RecordDict
from flwr.app.message import make_message

from bcsfl_flower.prompt_grid import PromptGrid


def instruction(node_id: int, number: int):
    meta = metadata(node_id, "evaluate")
    meta.__dict__["_message_id"] = f"ins-{number}"
    meta.__dict__["_dst_node_id"] = node_id
    return make_message(metadata=meta, content=RecordDict())


class SlowGrid:
    """Node ``n``'s reply shows up on the ``delays[n]``-th pull (never if absent)."""

    def __init__(self, delays: dict[int, int]):
        self.delays = delays
        self.pulls = 0
        self.pushed = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [
            reply_to(m, RecordDict({"metrics": MetricRecord({"node": m.metadata.dst_node_id})}))
            for m in self.pushed
            if m.metadata.message_id in wanted
            and self.delays.get(m.metadata.dst_node_id) == self.pulls
        ]

    def get_node_ids(self):
        return [1, 2, 3]

    @property
    def run(self):
        return "the-run"


@pytest.fixture
def pauses(monkeypatch):
    recorded: list[float] = []
    monkeypatch.setattr("bcsfl_flower.prompt_grid.time.sleep", recorded.append)
    return recorded


def test_collects_every_reply_and_stops_pulling(pauses):
    inner = SlowGrid({1: 1, 2: 3, 3: 6})
    grid = PromptGrid(inner, min_interval=0.1, max_interval=0.4, backoff=2.0)
    replies = list(grid.send_and_receive([instruction(n, n) for n in (1, 2, 3)], timeout=None))
    assert sorted(r.content["metrics"]["node"] for r in replies) == [1, 2, 3]
    assert inner.pulls == 6  # no pull after the last reply arrived
    # grows geometrically while nothing arrives, capped; short again after a reply
    assert pauses == [0.1, 0.2, 0.1, 0.2, 0.4]


def test_a_reply_that_never_comes_is_missing_after_the_timeout():
    inner = SlowGrid({1: 1})  # node 2 never answers
    grid = PromptGrid(inner, min_interval=0.01, max_interval=0.02)
    replies = list(grid.send_and_receive([instruction(1, 1), instruction(2, 2)], timeout=0.1))
    assert [r.metadata.reply_to_message_id for r in replies] == ["ins-1"]
    assert inner.pulls >= 2


def test_delegates_the_rest_of_the_grid():
    inner = SlowGrid({})
    grid = PromptGrid(inner)
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert grid.run == "the-run"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_interval": 0.0}, "min_interval"),
        ({"min_interval": 5.0, "max_interval": 1.0}, "min_interval"),
        ({"backoff": 0.5}, "backoff"),
    ],
)
def test_rejects_bad_intervals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptGrid(SlowGrid({}), **kwargs)
