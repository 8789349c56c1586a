"""The DP frontier's specs, points and report (the runs themselves are real federations)."""

import csv

import pytest
from flwr.app import MetricRecord, RecordDict

from bcsfl_vision.app_metrics import aggregate_train_metrics
from sim.dp_frontier import (
    DP_BATCH_SIZE,
    DP_LEARNING_RATE,
    NOISE_MULTIPLIERS,
    FrontierPoint,
    frontier_specs,
    frontier_table,
    write_frontier,
)
from sim.grid import ExperimentSpec
from sim.records import RunResult


def test_a_dp_spec_names_its_noise_and_turns_dp_on():
    spec = ExperimentSpec("fedavg", "label-flip", 0.3, dp_noise_multiplier=1.5)
    assert spec.run_id == "mnist-fedavg-label-flip-30-dp1.5-s42"
    config = spec.run_config()
    assert config["dp"] is True and config["dp-noise-multiplier"] == 1.5
    assert spec.to_record()["dp_noise_multiplier"] == 1.5
    plain = ExperimentSpec("fedavg", "label-flip", 0.3)
    assert "dp" not in plain.run_config() and "dp_noise_multiplier" not in plain.to_record()
    with pytest.raises(ValueError, match="dp_noise_multiplier must be > 0"):
        ExperimentSpec("fedavg", "label-flip", 0.3, dp_noise_multiplier=0.0)


def test_a_spec_with_training_settings_names_and_passes_them():
    spec = ExperimentSpec(
        "bcsfl", "label-flip", 0.0, dp_noise_multiplier=2.0, batch_size=256, learning_rate=0.4
    )
    assert spec.run_id == "mnist-bcsfl-label-flip-00-dp2-b256-lr0.4-s42"
    config = spec.run_config()
    assert config["batch-size"] == 256 and config["learning-rate"] == 0.4
    assert spec.to_record()["batch_size"] == 256
    plain = ExperimentSpec("fedavg", "label-flip", 0.3)
    assert "batch-size" not in plain.run_config() and "batch_size" not in plain.to_record()
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        ExperimentSpec("fedavg", "label-flip", 0.3, batch_size=0)


def test_the_frontier_covers_every_noise_cell_and_strategy():
    specs = frontier_specs()
    assert len(specs) == len(NOISE_MULTIPLIERS) * 2 * 2
    assert {(s.strategy, s.attacker_fraction) for s in specs} == {
        (strategy, fraction) for strategy in ("fedavg", "bcsfl") for fraction in (0.0, 0.3)
    }
    assert {s.dp_noise_multiplier for s in specs} == set(NOISE_MULTIPLIERS)
    assert {(s.batch_size, s.learning_rate) for s in specs} == {(DP_BATCH_SIZE, DP_LEARNING_RATE)}
    assert {(s.num_clients, s.num_rounds, s.dirichlet_alpha) for s in specs} == {(20, 20, 0.5)}


def _run(strategy, noise, epsilon, accuracy, outcomes):
    spec = ExperimentSpec(
        strategy, "label-flip", 0.0, num_rounds=len(outcomes), dp_noise_multiplier=noise
    )
    rounds = {"0": {"round": 0, "test_accuracy": 0.1}}
    for number, outcome in enumerate(outcomes, start=1):
        rounds[str(number)] = {
            "round": number,
            "test_accuracy": accuracy,
            "max_dp_epsilon": epsilon * number / len(outcomes),
        }
        if outcome is not None:
            rounds[str(number)]["outcome"] = outcome
    return RunResult(
        spec, {"status": "completed", "final_test_accuracy": accuracy, "rounds": rounds}
    )


def test_a_point_is_the_last_rounds_epsilon_and_the_final_accuracy(tmp_path):
    bcsfl = FrontierPoint.of(_run("bcsfl", 1.0, 6.5, 0.91, ["commit", "rollback", "commit"]))
    fedavg = FrontierPoint.of(_run("fedavg", 2.0, 2.1, 0.85, [None, None, None]))
    assert (bcsfl.epsilon, bcsfl.accuracy, bcsfl.committed) == (6.5, 0.91, 2)
    assert fedavg.committed is None
    table = frontier_table([bcsfl, fedavg])
    assert table.index("| FedAvg |") < table.index("| BCSFL |")
    assert "| BCSFL | 0% | 1 | 6.50 | 0.910 | 2/3 |" in table
    written = write_frontier(tmp_path, [bcsfl, fedavg], "python -m sim.dp_frontier")
    assert [p.name for p in written] == ["frontier.md", "frontier.csv", "accuracy_vs_epsilon.png"]
    rows = list(csv.DictReader((tmp_path / "frontier.csv").open()))
    assert [row["strategy"] for row in rows] == ["fedavg", "bcsfl"]
    assert "`python -m sim.dp_frontier`" in (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "accuracy_vs_epsilon.png").stat().st_size > 1000


def test_flowers_strategies_report_the_largest_epsilon_not_the_average():
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": n, "dp-epsilon": e, "loss": 1.0})})
        for n, e in ((100, 2.0), (300, 5.0), (100, 3.0))
    ]
    metrics = aggregate_train_metrics(replies, "num-examples")
    assert metrics["dp-epsilon"] == 5.0 and metrics["loss"] == pytest.approx(1.0)
    plain = aggregate_train_metrics(
        [RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 2.0})})], "num-examples"
    )
    assert "dp-epsilon" not in plain


def test_the_partition_id_is_reported_per_client_but_never_averaged():
    replies = [
        RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 1.0, "partition-id": p})})
        for p in (0, 3, 7)
    ]
    metrics = aggregate_train_metrics(replies, "num-examples")
    assert "partition-id" not in metrics and metrics["loss"] == pytest.approx(1.0)
    assert replies[1]["metrics"]["partition-id"] == 3
