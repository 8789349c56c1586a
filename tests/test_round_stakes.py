"""Stake: slash hard, reward slowly, and initial stakes that a client cannot inflate."""

import math

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from bcsfl_flower.packets import ModelPacket, SignedModelPacket
from bcsfl_flower.round.bounds import EXAMPLE_CAP_RATIO
from bcsfl_flower.round.settings import RoundSettings, SettingError, StakePolicy
from bcsfl_flower.round.stakes import (
    INITIAL_STAKES,
    DataSizeStake,
    EqualStake,
    ExplicitStake,
    StakeChanges,
    StakeLedger,
    settle,
)
from bcsfl_flower.round.state import Contribution

ADDRESS = "0x" + "ab" * 20


def contribution(node=1, examples=100.0, address=None):
    packet = None
    if address is not None:
        packet = SignedModelPacket(ModelPacket(b"\0" * 32, 1, 1, address), b"\0" * 65)
    return Contribution(node, examples, MetricRecord(), RecordDict(), packet)


def test_ledger_registers_once_and_snapshots_in_id_order():
    ledger = StakeLedger({"b": 2.0})
    ledger.register("a", 1.0)
    assert ledger.as_dict() == {"a": 1.0, "b": 2.0} and len(ledger) == 2 and "a" in ledger
    np.testing.assert_array_equal(ledger.stakes_for(["b", "a"]), [2.0, 1.0])
    assert ledger.total() == 3.0
    with pytest.raises(ValueError, match="already registered"):
        ledger.register("a", 5.0)  # re-registering would reset a slashed stake
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite and >= 0"):
            ledger.register("c", bad)
    with pytest.raises(TypeError):
        ledger.register(3, 1.0)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="not registered"):
        ledger.stake("zz")


def test_settle_slashes_a_fraction_and_rewards_a_constant():
    before = {"good": 1.0, "bad": 1.0, "idle": 1.0}
    settlement = settle(
        before,
        StakeChanges(rewarded=("good", "unknown"), slashed=("bad", "unknown")),
        StakePolicy(0.05, 0.5),
    )
    assert settlement.after == {"good": 1.05, "bad": 0.5, "idle": 1.0}
    assert settlement.rewarded == ("good",) and settlement.slashed == ("bad",)
    assert settlement.before == before
    ledger = StakeLedger(before)
    ledger.apply(settlement)
    assert ledger.as_dict() == {"bad": 0.5, "good": 1.05, "idle": 1.0}


def test_slashing_wins_and_recovery_is_slow():
    policy = StakePolicy(0.05, 0.5)
    stake = {"x": 1.0}
    stake = dict(settle(stake, StakeChanges(rewarded=("x",), slashed=("x",)), policy).after)
    assert stake == {"x": 0.5}
    rounds = 0
    while stake["x"] < 1.0:
        stake = dict(settle(stake, StakeChanges(rewarded=("x",)), policy).after)
        rounds += 1
    assert rounds == 10  # one rejection costs ten honest rounds


@pytest.mark.parametrize(
    ("reward", "slash", "setting"),
    [(-0.1, 0.5, "stake_reward"), (math.nan, 0.5, "stake_reward"), (0.1, 1.0, "stake_slash")],
)
def test_stake_settings_are_validated(reward, slash, setting):
    with pytest.raises(SettingError) as error:
        RoundSettings(stake_reward=reward, stake_slash=slash)
    assert error.value.setting == setting


def test_initial_stakes_by_rule_and_table():
    assert set(INITIAL_STAKES) == {"equal", "data-size", "explicit"}
    assert EqualStake()(contribution(examples=5000), 100.0) == 1.0
    # A client's own count is capped: claiming 1e300 examples buys the median client's.
    assert EXAMPLE_CAP_RATIO == 1.0
    assert DataSizeStake()(contribution(examples=50.0), 100.0) == 50.0
    assert DataSizeStake()(contribution(examples=150.0), 100.0) == 100.0
    assert DataSizeStake()(contribution(examples=1e300), 100.0) == 100.0
    table = {ADDRESS: 0.25, "7": 3.0}
    assert ExplicitStake(table)(contribution(node=1, address=ADDRESS), 100.0) == 0.25
    assert ExplicitStake(table)(contribution(node=7), 100.0) == 3.0
    assert ExplicitStake(table)(contribution(node=8), 100.0) == 1.0
    # The table wins in every mode: the address proved by a signed packet is the key.
    assert EqualStake(table)(contribution(node=2, address=ADDRESS), 100.0) == 0.25


def test_rewards_stop_at_the_ceiling_so_nobody_accumulates_the_committee():
    policy = StakePolicy(0.5, 0.5, ceiling=2.0)
    stakes = {str(i): 1.0 for i in range(5)}
    for _ in range(20):  # client 0 is always rewarded, client 4 always slashed
        stakes = dict(settle(stakes, StakeChanges(rewarded=("0",), slashed=("4",)), policy).after)
        median = float(np.median(list(stakes.values())))
        assert stakes["0"] <= 2.0 * median + 1e-12
    assert stakes["0"] == 2.0 and stakes["4"] < 1e-5
    # a stake already above the ceiling is not cut by a reward, only not raised
    above = settle({"a": 5.0, "b": 1.0, "c": 1.0}, StakeChanges(rewarded=("a",)), policy).after
    assert above["a"] == 5.0


def test_stake_ceiling_is_validated():
    with pytest.raises(SettingError) as error:
        RoundSettings(stake_ceiling=0.5)
    assert error.value.setting == "stake_ceiling"
    assert RoundSettings(stake_ceiling=3.0).stake_policy.ceiling == 3.0


def test_a_left_out_client_loses_a_tenth_and_a_rejected_one_half():
    policy = StakePolicy()
    after = settle(
        {"a": 1.0, "b": 1.0, "c": 1.0},
        StakeChanges(rewarded=("c",), slashed=("a",), left_out=("b", "a")),
        policy,
    ).after
    assert after == {"a": 0.5, "b": pytest.approx(0.9), "c": 1.05}
