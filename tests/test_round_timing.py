"""Each round records where its wall time went, stage by stage, on a clock the test drives."""

import time

import pytest
from flower_messages import FakeGrid
from flwr.app import ConfigRecord
from test_strategy import GLOBAL, federation, squared_distance

from bcsfl_flower.round.timing import StageClock, StageTimes
from bcsfl_flower.strategy import BCSFL


class SteppedClock:
    """A perf_counter that moves only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    stepped = SteppedClock()
    monkeypatch.setattr(time, "perf_counter", stepped)
    return stepped


def test_time_inside_a_stage_is_its_own_and_the_rest_is_the_decision(clock):
    stage_clock = StageClock()
    clock.now += 2.0  # deciding
    with stage_clock.stage("committee"):
        clock.now += 5.0
    with stage_clock.stage("anchoring"):
        clock.now += 1.5
    with stage_clock.stage("committee"):  # a second visit adds up
        clock.now += 1.0
    clock.now += 0.25
    assert stage_clock.times() == StageTimes(decision_s=2.25, committee_s=6.0, anchoring_s=1.5)


def test_an_unknown_stage_is_refused_by_name():
    with pytest.raises(ValueError, match="'voting'"), StageClock().stage("voting"):
        pass


def test_training_is_reported_only_when_measured():
    assert "training_s" not in StageTimes(decision_s=0.0004).to_json()
    assert StageTimes(decision_s=0.0004, training_s=1.23456).to_json() == {
        "decision_s": 0.0,
        "committee_s": 0.0,
        "anchoring_s": 0.0,
        "training_s": 1.235,
    }


def test_a_round_record_splits_training_the_committee_and_the_decision(clock):
    replies, _ = federation()

    def evaluate_one_second_each(node, arrays):
        clock.now += 1.0
        return squared_distance(node, arrays)

    strategy, grid, records = BCSFL(), FakeGrid(evaluate_one_second_each), []
    strategy.round_sink = lambda server_round, record: records.append(record)
    grid.get_node_ids = lambda: [r.metadata.src_node_id for r in replies]
    list(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid))
    clock.now += 30.0  # the clients train
    strategy.aggregate_train(1, replies)

    (record,) = records
    # w_t and the trusted mean on each validator: the mean committed, so no fallback was asked
    evaluations = len(grid.sent)
    assert evaluations == 2 * len(record["committee"]["validators"])
    assert record["timing"] == {
        "decision_s": 0.0,
        "committee_s": float(evaluations),
        "anchoring_s": 0.0,  # no chain in this strategy
        "training_s": 30.0,
    }
