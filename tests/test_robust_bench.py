"""The fast decision-quality bench: its attacks, baselines, pure BCSFL aggregate and report."""

import json
import logging

import byzfl
import numpy as np
import pytest
from conftest import DATA_DIR
from flower_messages import NodeGrid, update_replies
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp.strategy import FedAvg

from bcsfl_flower.round.aggregate import screened_mean
from bcsfl_vision.baselines import BASELINES, build_baseline
from bcsfl_vision.byzfl_strategy import ByzflStrategy, CenteredClippingStrategy
from sim import robust_bench
from sim.robust.attacks import RoundView
from sim.robust.report import accuracy_table, gini, summarise
from sim.robust.threats import ATTACKS

DIM = 40


def honest_updates(rng, count=14):
    common = rng.normal(size=DIM)
    return common + 0.3 * rng.normal(size=(count, DIM))


def test_screened_mean_is_the_trusted_mean_and_drops_a_coordinated_group():
    rng = np.random.default_rng(0)
    honest = honest_updates(rng)
    attack = np.tile(-3.0 * honest.mean(axis=0), (6, 1))  # sign flip, norm test catches it
    step = screened_mean(np.vstack([honest, attack]))
    np.testing.assert_allclose(step, screened_mean(np.vstack([honest, attack])))
    assert np.linalg.norm(step - honest.mean(axis=0)) < 0.2 * np.linalg.norm(honest.mean(axis=0))
    with np.errstate(all="ignore"):
        plain = np.vstack([honest, attack]).mean(axis=0)
    assert np.linalg.norm(plain - honest.mean(axis=0)) > np.linalg.norm(honest.mean(axis=0))


def test_byzfl_optimal_attacks_can_target_bcsfl_itself():
    rng = np.random.default_rng(1)
    honest = honest_updates(rng)
    attack = byzfl.Optimal_InnerProductManipulation(agg=screened_mean, pre_agg_list=[], f=6)
    vector = np.asarray(attack(honest))
    assert vector.shape == (DIM,) and np.all(np.isfinite(vector))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_returns_one_update_per_attacker(name):
    rng = np.random.default_rng(2)
    honest, own = honest_updates(rng), honest_updates(rng, 6)
    view = RoundView(7, honest, own, screened_mean, rng)
    attack = ATTACKS[name]()
    assert attack.training(7) in {"honest", "flip", "backdoor", "dba"}
    with np.errstate(all="ignore"):
        updates = attack.updates(view)
    assert np.asarray(updates).shape == (6, DIM)


def test_byzfl_strategy_aggregates_updates_and_leaves_out_non_finiteupdate_replies():
    rng = np.random.default_rng(3)
    weights = np.zeros(DIM, np.float32)
    honest = honest_updates(rng, 16)
    updates = np.vstack([honest, np.full((4, DIM), 1e3)])
    updates[-1, 0] = np.inf
    strategy = ByzflStrategy(byzfl.Median(), fraction_evaluate=0.0)
    arrays = ArrayRecord({"w": Array(weights)})
    list(strategy.configure_train(1, arrays, ConfigRecord(), NodeGrid()))
    new, _ = strategy.aggregate_train(1, update_replies(weights, updates))
    expected = np.median(updates[:-1], axis=0)
    np.testing.assert_allclose(new["w"].numpy(), expected, rtol=1e-5)


def test_centered_clipping_clips_at_the_median_norm_around_its_last_step():
    rng = np.random.default_rng(4)
    weights = np.zeros(DIM, np.float32)
    updates = np.vstack([honest_updates(rng, 16), np.full((4, DIM), 50.0)])
    strategy = CenteredClippingStrategy(byzfl.CenteredClipping(), fraction_evaluate=0.0)
    list(
        strategy.configure_train(1, ArrayRecord({"w": Array(weights)}), ConfigRecord(), NodeGrid())
    )
    new, _ = strategy.aggregate_train(1, update_replies(weights, updates))
    radius = np.median(np.linalg.norm(updates, axis=1))
    assert strategy.aggregator.tau == pytest.approx(radius)
    assert np.linalg.norm(new["w"].numpy()) <= radius + 1e-3  # every vector clipped to radius


def test_gini_is_zero_for_equal_and_near_one_for_one_holder():
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 0, 0, 0, 0, 0, 0, 1]) == pytest.approx(0.9)


def test_bench_runs_resumes_and_reports_on_real_mnist(tmp_path, monkeypatch, capsys):
    tiny = robust_bench.Preset(
        "logreg",
        (0.5,),
        (0.2,),
        ("label-flip",),
        ("fedavg", "bcsfl"),
        (42,),
        rounds=2,
        max_train=64,
    )
    monkeypatch.setitem(robust_bench.PRESETS, "tiny", tiny)
    args = ["--preset", "tiny", "--out", str(tmp_path), "--data-dir", str(DATA_DIR)]
    assert robust_bench.main(args) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4  # clean and label flip 20%, FedAvg and BCSFL
    result = json.loads(runs[0].read_text())
    assert len(result["rounds"]) == 2 and 0.0 <= result["rounds"][-1]["accuracy"] <= 1.0
    bcsfl = summarise(
        json.loads(
            (
                tmp_path
                / "runs"
                / next(p.name for p in runs if "label-flip" in p.name and "bcsfl" in p.name)
            ).read_text()
        )
    )
    assert {"honest_rejected", "byzantine_rejected", "gini", "validators"} <= set(bcsfl)
    table = (tmp_path / "table.md").read_text()
    assert "Worst case over attacks" in table and "label-flip" in table
    assert (tmp_path / "worst_case.png").stat().st_size > 0
    capsys.readouterr()
    assert robust_bench.main(args) == 0
    assert "4 of 4 runs done, 0 to run" in capsys.readouterr().out


def test_the_bench_leaves_flowers_logger_as_it_found_it(tmp_path):
    """An in-process bench must not silence Flower's logs for whatever runs next."""
    before = FLOWER_LOGGER.level
    assert before != logging.WARNING
    args = ["--preset", "quick", "--out", str(tmp_path), "--report-only"]
    assert robust_bench.main(args) == 0
    assert FLOWER_LOGGER.level == before


def test_every_baseline_builds_from_its_run_config_name():
    for name in BASELINES:
        assert isinstance(build_baseline(name, num_nodes=20, attacker_fraction=0.3), FedAvg)
    clipping = build_baseline("centered-clipping", num_nodes=20, attacker_fraction=0.3)
    assert isinstance(clipping, CenteredClippingStrategy)
    trimmed = build_baseline("arc-nnm-trmean", num_nodes=20, attacker_fraction=0.3)
    assert trimmed.aggregator.f == 6  # told the expected number of attackers
    assert [type(p).__name__ for p in trimmed.pre_aggregators] == ["ARC", "NNM"]
    with pytest.raises(ValueError, match="unknown baseline 'bulyan'"):
        build_baseline("bulyan", num_nodes=20, attacker_fraction=0.3)


def test_the_accuracy_table_compares_contenders_on_the_seeds_they_all_ran():
    cell = {"model": "logreg", "alpha": 0.1, "share": 0.0, "attack": "clean"}
    rows = [
        {**cell, "strategy": "fedavg", "seed": 42, "accuracy": 0.8},
        {**cell, "strategy": "fedavg", "seed": 43, "accuracy": 0.2},  # BCSFL has no seed 43
        {**cell, "strategy": "bcsfl", "seed": 42, "accuracy": 0.9},
    ]
    (line,) = accuracy_table(rows, ["fedavg", "bcsfl"])[2:]
    assert line == "| logreg | alpha 0.1 | 0% | clean | 0.800 | 0.900 | 1 |"
