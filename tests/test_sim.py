"""The experiment machinery of sim/: metrics, grid, resumable runner, outputs, CIFAR-10 path.

The end-to-end test runs the `fast` preset for real (4 `flwr run` federations on
MNIST through the launcher) and then runs it again to show nothing is recomputed.
"""

import csv
import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, REPO

from bcsfl_vision.launch import FederationFailedError, FederationRun
from bcsfl_vision.task.attacks import choose_attackers
from bcsfl_vision.task.data import load_client_data, load_split, load_test_data
from bcsfl_vision.task.models import build_model
from bcsfl_vision.task.training import evaluate_confusion
from sim.experiments import (
    EXIT_OK,
    EXIT_USAGE,
    GridPart,
    _reproducing,
    check_data,
    main,
    report_parts,
)
from sim.figures import figure_seed
from sim.grid import (
    CLEAN,
    FLOWER_GRID_STRATEGIES,
    PRESETS,
    Cell,
    ExperimentSpec,
    share_label,
)
from sim.metrics import (
    FLIP_ALL,
    attack_success_rate,
    count_rollbacks,
    mean_defined,
    min_source_class_accuracy,
    source_class_accuracy,
)
from sim.records import ROUND_COLUMNS, SUMMARY_COLUMNS, RunResult
from sim.report import accuracy_pivot, runs_table, seed_spread
from sim.runner import SPEC_FILE, GridRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- metrics on hand-made confusion matrices ---------------------------------------------


def test_a_perfect_model_has_full_source_accuracy_and_no_attack_success():
    confusion = np.diag(np.arange(1, 11)) * 10
    assert source_class_accuracy(confusion) == 1.0
    assert attack_success_rate(confusion) == 0.0
    assert min_source_class_accuracy(confusion) == 1.0


def test_a_fully_flipped_model_has_attack_success_one():
    confusion = np.zeros((10, 10), dtype=int)
    for c in range(10):
        confusion[c, 9 - c] = 7
    assert attack_success_rate(confusion) == 1.0
    assert source_class_accuracy(confusion) == 0.0


def test_targeted_mapping_counts_only_source_rows_and_target_column():
    confusion = np.zeros((10, 10), dtype=int)
    confusion[0, 0], confusion[0, 9], confusion[0, 5] = 6, 3, 1  # source class 0 -> 9
    confusion[1, 1], confusion[1, 8] = 2, 8  # class 1 is not a source here
    confusion[9, 9] = 50  # target class row: not counted
    assert source_class_accuracy(confusion, {0: 9}) == pytest.approx(0.6)
    assert attack_success_rate(confusion, {0: 9}) == pytest.approx(0.3)
    # two sources pooled: (6 + 2) / 20 correct, (3 + 8) / 20 to their targets
    assert source_class_accuracy(confusion, {0: 9, 1: 8}) == pytest.approx(0.4)
    assert attack_success_rate(confusion, {0: 9, 1: 8}) == pytest.approx(0.55)
    assert min_source_class_accuracy(confusion, {0: 9, 1: 8}) == pytest.approx(0.2)


def test_flip_all_source_accuracy_is_test_accuracy_and_asr_reads_anti_diagonal():
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 20, size=(10, 10))
    assert source_class_accuracy(confusion, FLIP_ALL) == pytest.approx(
        np.trace(confusion) / confusion.sum()
    )
    anti = sum(confusion[c, 9 - c] for c in range(10))
    assert attack_success_rate(confusion, FLIP_ALL) == pytest.approx(anti / confusion.sum())


def test_source_classes_without_samples_give_none():
    confusion = np.zeros((10, 10), dtype=int)
    confusion[3, 3] = 4
    assert attack_success_rate(confusion, {0: 9}) is None
    assert source_class_accuracy(confusion, {0: 9}) is None
    assert min_source_class_accuracy(confusion, {0: 9, 3: 6}) == 1.0


@pytest.mark.parametrize(
    ("confusion", "mapping", "message"),
    [
        (np.zeros((10, 9)), FLIP_ALL, "square"),
        (-np.ones((10, 10)), FLIP_ALL, "negative"),
        (np.zeros((10, 10)), {0: 10}, "outside"),
        (np.zeros((10, 10)), {4: 4}, "its own target"),
        (np.zeros((10, 10)), {}, "at least one"),
    ],
)
def test_bad_confusion_or_mapping_is_named(confusion, mapping, message):
    with pytest.raises(ValueError, match=message):
        attack_success_rate(confusion, mapping)


def test_mean_defined_skips_undefined_rounds():
    assert mean_defined([None, 0.5, 1.0, None]) == pytest.approx(0.75)
    assert mean_defined([0.0, 0.0]) == 0.0
    assert mean_defined([None, None]) is None
    assert mean_defined([]) is None


def test_rollbacks_are_counted_only_where_rounds_record_an_outcome():
    rounds = {"0": {}, "1": {"outcome": "commit"}, "2": {"outcome": "rollback"}}
    rounds["3"] = {"outcome": "rollback"}
    assert count_rollbacks(rounds) == 2
    assert count_rollbacks({"0": {}, "1": {"test_accuracy": 0.9}}) is None


def _confusion(accuracy_per_class):
    confusion = np.zeros((10, 10), dtype=int)
    for c, correct in enumerate(accuracy_per_class):
        confusion[c, c] = correct
        confusion[c, 9 - c] += 10 - correct
    return confusion.tolist()


def test_run_summary_aggregates_precision_recall_rejections_and_rollbacks():
    spec = ExperimentSpec("bcsfl", "label-flip", 0.3, num_clients=4, num_rounds=3)
    results = {
        "status": "completed",
        "final_test_accuracy": 0.8,
        "rounds": {
            "0": {"round": 0, "test_accuracy": 0.1, "confusion": _confusion([1] * 10)},
            "1": {
                "round": 1,
                "rejected": {"11": "cosine", "12": "cosine"},
                "rejected_partitions": [1, 2],
                "attacker_precision": 0.5,
                "attacker_recall": 1.0,
                "outcome": "commit",
                "test_accuracy": 0.7,
                "confusion": _confusion([7] * 10),
            },
            "2": {
                "round": 2,
                "rejected": {},
                "rejected_partitions": [],
                "attacker_precision": None,
                "attacker_recall": 0.0,
                "outcome": "rollback",
                "test_accuracy": 0.7,
                "confusion": _confusion([7] * 10),
            },
            "3": {
                "round": 3,
                "rejected": {"11": "cosine"},
                "rejected_partitions": [1],
                "attacker_precision": 1.0,
                "attacker_recall": 1.0,
                "outcome": "commit",
                "test_accuracy": 0.8,
                "confusion": _confusion([9, 9, 9, 9, 9, 9, 9, 9, 9, 0]),
            },
        },
    }
    run = RunResult(spec, results, wall_s=12.5)
    rows = run.round_rows()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == set(ROUND_COLUMNS)
    assert rows[1]["num_rejected"] == 2 and rows[1]["rejected_partitions"] == "1;2"
    assert rows[0]["num_rejected"] is None
    assert rows[1]["attack_success_rate"] == pytest.approx(0.3)
    summary = run.summary()
    assert summary["mean_attacker_precision"] == pytest.approx(0.75)  # round 2 undefined
    assert summary["mean_attacker_recall"] == pytest.approx(2 / 3)
    assert summary["mean_rejected"] == pytest.approx(1.0)
    assert summary["rollbacks"] == 1
    assert summary["final_accuracy"] == 0.8
    assert summary["final_min_source_class_accuracy"] == 0.0
    assert summary["final_attack_success_rate"] == pytest.approx(0.19)
    assert summary["wall_s"] == 12.5


def test_baseline_runs_have_no_rejections_and_no_asr_outside_label_flipping():
    spec = ExperimentSpec("krum", "sign-flip", 0.3, num_clients=4, num_rounds=1)
    results = {
        "status": "completed",
        "rounds": {
            "0": {"round": 0, "test_accuracy": 0.1, "confusion": _confusion([1] * 10)},
            "1": {"round": 1, "test_accuracy": 0.5, "confusion": _confusion([5] * 10)},
        },
    }
    summary = RunResult(spec, results).summary()
    assert summary["final_accuracy"] == 0.5  # falls back to the last round
    assert summary["final_attack_success_rate"] is None
    assert summary["rollbacks"] is None
    assert summary["mean_rejected"] is None
    assert summary["mean_attacker_precision"] is None


# -- the grid -------------------------------------------------------------------------------


def test_full_preset_is_the_paper_grid_and_the_stake_cell():
    specs = PRESETS["full"].specs()
    assert len(specs) == 7 * (4 + 1 + 3) == 56
    assert len({s.run_id for s in specs}) == len(specs)
    assert {s.strategy for s in specs} == set(FLOWER_GRID_STRATEGIES)
    cells = {(s.attack, s.attacker_fraction, s.attacker_stake_share) for s in specs}
    assert cells == (
        {("label-flip", f, None) for f in (0.0, 0.1, 0.3, 0.5)}
        | {("label-flip", 0.5, 1 / 3)}
        | {(a, 0.3, None) for a in ("sign-flip", "gaussian-noise", "scale")}
    )
    assert {(s.num_clients, s.num_rounds, s.dirichlet_alpha, s.dataset, s.seed) for s in specs} == {
        (20, 20, 0.5, "mnist", 42)
    }
    # the 49 runs of the paper's grid keep the run ids they were committed under
    committed = [s for s in specs if s.attacker_stake_share is None]
    assert len(committed) == 49
    assert "mnist-krum-label-flip-30-s42" in {s.run_id for s in committed}
    stake = [s.run_id for s in specs if s.attacker_stake_share is not None]
    assert stake == [f"mnist-{name}-label-flip-50-stake33-s42" for name in FLOWER_GRID_STRATEGIES]


def test_fast_preset_is_unchanged():
    specs = PRESETS["fast"].specs()
    assert [s.run_id for s in specs] == [
        "mnist-fedavg-label-flip-00-s42",
        "mnist-bcsfl-label-flip-00-s42",
        "mnist-fedavg-label-flip-30-s42",
        "mnist-bcsfl-label-flip-30-s42",
    ]
    assert {(s.num_clients, s.num_rounds, s.attacker_stake_share) for s in specs} == {(4, 2, None)}


def test_small_and_seeds_presets():
    small = PRESETS["small"].specs()
    assert len(small) == 4 * 5
    assert {s.strategy for s in small} == {"fedavg", "bcsfl", "multikrum", "fedtrimmedavg"}
    assert {(s.num_clients, s.num_rounds, s.seed) for s in small} == {(10, 8, 42)}
    assert [c.label for c in PRESETS["small"].cells] == [
        "clean",
        "label-flip 30%",
        "label-flip 50% (attackers 1/3 stake)",
        "sign-flip 30%",
        "scale 30%",
    ]
    stake = next(s for s in small if s.attacker_stake_share is not None)
    assert stake.num_attackers == 5 and stake.run_config()["attacker-stake"] == 0.5

    seeds = PRESETS["seeds"].specs()
    assert len(seeds) == 40 == len({s.run_id for s in seeds})
    assert {s.seed for s in seeds} == {43, 44}
    assert {s.strategy for s in seeds} == {
        "fedavg",
        "bcsfl",
        "multikrum",
        "fedmedian",
        "fedtrimmedavg",
    }
    assert {s.cell.label for s in seeds} == {
        "label-flip 30%",
        "label-flip 50%",
        "label-flip 50% (attackers 1/3 stake)",
        "scale 30%",
    }
    assert {(s.num_clients, s.num_rounds) for s in seeds} == {(20, 20)}
    # a preset with a clean cell has it first
    for preset in PRESETS.values():
        if CLEAN in preset.cells:
            assert preset.cells[0] == CLEAN


def test_skewed_preset_runs_alpha_01_cells_against_the_byzfl_baseline():
    specs = PRESETS["skewed"].specs()
    assert len(specs) == 4 * 3 == len({s.run_id for s in specs})
    assert {s.strategy for s in specs} == {"fedavg", "bcsfl", "multikrum", "centered-clipping"}
    assert {s.cell.label for s in specs} == {"clean", "label-flip 30%", "sign-flip 30%"}
    assert all(s.run_config()["dirichlet-alpha"] == 0.1 for s in specs)
    assert all(s.run_id.endswith("-a0.1-s42") for s in specs)
    clipping = next(s for s in specs if s.strategy == "centered-clipping")
    assert clipping.run_config()["strategy"] == "centered-clipping"
    # The paper grid keeps its seven strategies and its run ids (alpha 0.5 is not named).
    assert ExperimentSpec("bcsfl", "label-flip", 0.3).run_id == "mnist-bcsfl-label-flip-30-s42"
    assert "centered-clipping" not in {s.strategy for s in PRESETS["full"].specs()}


def test_stake_share_sets_attacker_stake_and_names_the_run():
    spec = ExperimentSpec("bcsfl", "label-flip", 0.5, attacker_stake_share=1 / 3)
    assert spec.num_attackers == 10
    config = spec.run_config()
    assert config["attacker-stake"] == 0.5  # 10 x 0.5 / (10 x 0.5 + 10) = 1/3
    assert spec.run_id == "mnist-bcsfl-label-flip-50-stake33-s42"
    # the attackers' share of the initial stake is the share asked for, for any size
    other = ExperimentSpec("fedavg", "scale", 0.3, num_clients=7, attacker_stake_share=0.2)
    k, n, x = other.num_attackers, other.num_clients, other.attacker_stake
    assert k == 2 and k * x / (k * x + n - k) == pytest.approx(0.2)
    assert other.run_config()["attacker-stake"] == x  # Flower's strategies get it too

    plain = ExperimentSpec("bcsfl", "label-flip", 0.5)
    assert "attacker-stake" not in plain.run_config() and plain.attacker_stake is None
    assert plain.run_id == "mnist-bcsfl-label-flip-50-s42"
    assert spec.cell.label == "label-flip 50% (attackers 1/3 stake)"
    assert spec.cell.attackers_label == "50%, 1/3 stake"
    assert plain.cell.label == "label-flip 50%"
    assert ExperimentSpec("krum", "sign-flip", 0.0).cell == CLEAN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attacker_stake_share": 0.0}, r"attacker_stake_share must be in \(0, 1\)"),
        ({"attacker_stake_share": 1.0}, r"attacker_stake_share must be in \(0, 1\)"),
        ({"attacker_fraction": 0.0, "attacker_stake_share": 0.3}, "at least one attacker"),
        ({"attacker_fraction": 0.02, "attacker_stake_share": 0.3}, "at least one attacker"),
        ({"attacker_fraction": 0.98, "attacker_stake_share": 0.3}, "one honest client"),
    ],
)
def test_bad_stake_shares_are_rejected(kwargs, message):
    values = {"strategy": "bcsfl", "attack": "label-flip", "attacker_fraction": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        ExperimentSpec(**values)


def test_share_labels_and_cell_order():
    assert share_label(1 / 3) == "1/3" and share_label(0.25) == "1/4"
    assert share_label(0.35) == "35%"
    cells = [
        Cell("scale", 0.3),
        Cell("label-flip", 0.5, 1 / 3),
        Cell("sign-flip", 0.3),
        Cell("label-flip", 0.5),
        CLEAN,
        Cell("label-flip", 0.1),
    ]
    assert [c.label for c in sorted(cells, key=Cell.sort_key)] == [
        "clean",
        "label-flip 10%",
        "label-flip 50%",
        "label-flip 50% (attackers 1/3 stake)",
        "sign-flip 30%",
        "scale 30%",
    ]


def test_spec_run_config_selects_strategy_attack_and_scale():
    config = ExperimentSpec("bcsfl-paper", "scale", 0.3, dataset="cifar10").run_config()
    assert config["strategy"] == "bcsfl" and config["selection"] == "paper"
    assert config["attack"] == "scale" and config["attack-scale"] == 10.0
    assert config["dataset"] == "cifar10" and config["attacker-fraction"] == 0.3
    assert ExperimentSpec("krum", "label-flip", 0.0).run_config()["strategy"] == "krum"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "fedprox"}, "unknown strategy"),
        ({"attack": "backdoor"}, "unknown attack"),
        ({"attacker_fraction": 1.0}, "attacker_fraction"),
        ({"dataset": "svhn"}, "unknown dataset"),
    ],
)
def test_bad_specs_are_rejected_by_name(kwargs, message):
    values = {"strategy": "fedavg", "attack": "label-flip", "attacker_fraction": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        ExperimentSpec(**values)


# -- the runner, with a stand-in federation (the real one runs in the end-to-end test) --------


class CountingLaunch:
    """Stands in for run_federation: writes a completed results.json and counts calls."""

    def __init__(self, fail_on=()):
        self.calls = []
        self.fail_on = set(fail_on)
        self.displays = []

    def __call__(
        self, output_dir, *, num_supernodes, run_config, data_dir, timeout, stream, progress
    ):
        self.calls.append((output_dir.name, num_supernodes, dict(run_config)))
        self.displays.append(progress)
        if output_dir.name in self.fail_on:
            raise FederationFailedError("boom")
        results = {"status": "completed", "final_test_accuracy": 0.5, "rounds": {}}
        (output_dir / "results.json").write_text(json.dumps(results))
        return FederationRun(output_dir, results, output_dir / "run.log")


def test_runner_skips_complete_runs_redoes_outdated_ones_and_survives_failures(tmp_path):
    specs = [
        ExperimentSpec("fedavg", "label-flip", 0.0, num_clients=3, num_rounds=1),
        ExperimentSpec("bcsfl", "label-flip", 0.0, num_clients=3, num_rounds=1),
    ]
    launch = CountingLaunch(fail_on={specs[1].run_id})
    runner = GridRunner(tmp_path, data_dir=DATA_DIR, launch=launch)
    first = runner.run(specs)
    assert first.ran == [specs[0].run_id] and list(first.failed) == [specs[1].run_id]
    assert launch.calls[0][1] == 3 and launch.calls[0][2]["strategy"] == "fedavg"
    assert runner.is_complete(specs[0]) and not runner.is_complete(specs[1])
    grid_bar = launch.displays[-1].tasks[0]  # each run is followed on the grid's display
    assert (grid_bar.completed, grid_bar.total, grid_bar.description) == (2, 2, "ran 1, failed 1")

    launch.fail_on.clear()
    second = runner.run(specs)
    assert second.reused == [specs[0].run_id] and second.ran == [specs[1].run_id]
    assert len(launch.calls) == 3

    assert runner.run(specs).ran == [] and len(launch.calls) == 3  # nothing left to do

    # a run made with other settings is not this run: it is redone
    spec_file = runner.run_dir(specs[0]) / SPEC_FILE
    recorded = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**recorded, "num_rounds": 5}))
    assert not runner.is_complete(specs[0])
    assert runner.run(specs).ran == [specs[0].run_id]
    assert json.loads(spec_file.read_text()) == specs[0].to_record()


def test_spec_record_leaves_out_an_unset_stake_share():
    plain = ExperimentSpec("krum", "label-flip", 0.3)
    record = plain.to_record()
    assert "attacker_stake_share" not in record
    assert record == {k: v for k, v in dataclasses.asdict(plain).items() if v is not None}
    stake = ExperimentSpec("krum", "label-flip", 0.5, attacker_stake_share=1 / 3)
    assert stake.to_record() == {
        k: v for k, v in dataclasses.asdict(stake).items() if v is not None
    }
    assert stake.to_record()["attacker_stake_share"] == pytest.approx(1 / 3)


def test_runs_recorded_before_the_stake_field_are_still_complete(tmp_path):
    # spec.json exactly as the committed runs of sim/results/full have it
    old_style = {
        "strategy": "krum",
        "attack": "label-flip",
        "attacker_fraction": 0.3,
        "dataset": "mnist",
        "num_clients": 20,
        "num_rounds": 20,
        "dirichlet_alpha": 0.5,
        "seed": 42,
    }
    spec = ExperimentSpec("krum", "label-flip", 0.3)
    run_dir = tmp_path / "runs" / spec.run_id
    run_dir.mkdir(parents=True)
    (run_dir / SPEC_FILE).write_text(json.dumps(old_style, indent=2))
    (run_dir / "results.json").write_text(json.dumps({"status": "completed", "rounds": {}}))
    launch = CountingLaunch()
    runner = GridRunner(tmp_path, data_dir=DATA_DIR, launch=launch)
    assert runner.is_complete(spec)
    assert runner.run([spec]).reused == [spec.run_id] and launch.calls == []
    # a stake run is another run (another directory), and a record with the share set
    # does not pass for the spec without it
    stake = dataclasses.replace(spec, attacker_fraction=0.5, attacker_stake_share=1 / 3)
    assert not runner.is_complete(stake)
    (run_dir / SPEC_FILE).write_text(json.dumps({**old_style, "attacker_stake_share": 0.25}))
    assert not runner.is_complete(spec)


def test_committed_full_runs_without_stake_field_count_as_complete():
    # Flower's rows were run before the stake field existed and are reused as they are;
    # whether the stake cells are done depends on how far the grid has run, so only the
    # reuse of the older records is asserted here
    runner = GridRunner(REPO / "sim" / "results" / "full", data_dir=DATA_DIR)
    baselines = [
        s
        for s in PRESETS["full"].specs()
        if s.attacker_stake_share is None and not s.strategy.startswith("bcsfl")
    ]
    assert baselines and all(runner.is_complete(s) for s in baselines)


# -- several presets and seeds in one report, on fake completed runs ---------------------------


def write_fake_run(out, spec, accuracy, *, status="completed"):
    """Write a run directory as the runner leaves it, with a constant accuracy curve."""
    run_dir = out / "runs" / spec.run_id
    run_dir.mkdir(parents=True)
    correct = round(accuracy * 10)
    rounds = {
        str(r): {"round": r, "test_accuracy": accuracy, "confusion": _confusion([correct] * 10)}
        for r in range(spec.num_rounds + 1)
    }
    results = {"status": status, "final_test_accuracy": accuracy, "rounds": rounds}
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / SPEC_FILE).write_text(json.dumps(spec.to_record()))
    (run_dir / "timing.json").write_text(json.dumps({"wall_s": 60.0}))
    return run_dir


def test_pivot_shows_mean_range_and_number_of_seeds():
    def run(seed, accuracy, share=None):
        spec = ExperimentSpec(
            "fedavg", "label-flip", 0.5, num_rounds=1, seed=seed, attacker_stake_share=share
        )
        return RunResult(spec, {"status": "completed", "final_test_accuracy": accuracy})

    runs = [run(42, 0.5), run(43, 0.7), run(44, 0.6), run(42, 0.9, 1 / 3)]
    assert seed_spread([]) == "—" and seed_spread([0.25]) == "0.250"
    assert seed_spread([0.5, 0.7, 0.6]) == "0.600 (0.500–0.700, 3 seeds)"
    pivot = accuracy_pivot(runs)
    assert pivot.splitlines()[0] == (
        "| strategy | label-flip 50% | label-flip 50% (attackers 1/3 stake) |"
    )
    assert "| FedAvg | 0.600 (0.500–0.700, 3 seeds) | 0.900 |" in pivot
    table = runs_table(runs)
    assert "| label-flip | 50%, 1/3 stake | FedAvg | 42 | 0.900 |" in table
    assert [line.split("|")[4].strip() for line in table.splitlines()[2:]] == [
        "42",
        "43",
        "44",
        "42",
    ]
    assert figure_seed(runs) == 42 and figure_seed([]) is None


def test_full_and_seeds_presets_report_together_from_one_directory(tmp_path, capsys):
    out = tmp_path / "full"
    full = [s for s in PRESETS["full"].specs() if s.strategy in ("fedavg", "bcsfl")]
    for spec in full:
        write_fake_run(out, spec, 0.9)
    seeds = PRESETS["seeds"].specs(strategies=("fedavg",))
    for spec in seeds:
        write_fake_run(out, spec, 0.8 if spec.seed == 43 else 0.6)

    assert main(["--preset", "full", "--out", str(out), "--report-only"]) == EXIT_OK
    table = (out / "table.md").read_text()
    assert table.startswith("# Robustness grid `full` + `seeds` on MNIST")
    assert f"- `python -m sim.experiments --preset full --out {out}`" in table
    assert f"- `python -m sim.experiments --preset seeds --out {out}`" in table
    commands = [line for line in table.splitlines() if line.startswith("- `python")]
    assert len(commands) == 2 and not any("--report-only" in line for line in commands)
    planned = 56 + 40
    assert f"Runs: {len(full) + len(seeds)} of {planned} complete" in table
    assert "seed 42." in table and "seeds 43, 44." in table
    # FedAvg, label-flip 30%: 0.9 (seed 42), 0.8, 0.6
    header, _, *rows = table.split("## Final test accuracy")[1].strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    fedavg = next(r for r in rows if r.startswith("| FedAvg |"))
    values = dict(zip(columns, (c.strip() for c in fedavg.strip("|").split("|")), strict=True))
    assert values["clean"] == "0.900"
    assert values["label-flip 30%"] == "0.767 (0.600–0.900, 3 seeds)"
    assert values["label-flip 50% (attackers 1/3 stake)"] == "0.767 (0.600–0.900, 3 seeds)"
    assert values["sign-flip 30%"] == "0.900"
    assert "`attacker-stake` = 0.5 per attacker" in table

    with (out / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert list(summary[0]) == list(SUMMARY_COLUMNS)
    assert len(summary) == len(full) + len(seeds)
    stake_rows = [r for r in summary if r["attacker_stake_share"]]
    assert sorted(r["seed"] for r in stake_rows) == ["42", "42", "43", "44"]  # fedavg, bcsfl
    assert all(float(r["attacker_stake_share"]) == pytest.approx(1 / 3) for r in stake_rows)
    rounds_header = (out / "rounds.csv").read_text().splitlines()[0].split(",")
    assert "attacker_stake_share" in rounds_header and "seed" in rounds_header
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [
        "accuracy_gaussian-noise.png",
        "accuracy_label-flip.png",
        "accuracy_scale.png",
        "accuracy_sign-flip.png",
        "asr_label-flip.png",
    ]

    # the seeds preset, run (here: reported) into the same directory, reports the same
    first = table.split("## Final test accuracy")[1]
    assert main(["--preset", "seeds", "--out", str(out), "--report-only"]) == EXIT_OK
    again = (out / "table.md").read_text()
    assert again.split("## Final test accuracy")[1] == first
    assert again.index("--preset full") < again.index("--preset seeds")

    # --list shows the invocation's own plan only
    capsys.readouterr()
    assert main(["--preset", "seeds", "--out", str(out), "--list"]) == EXIT_OK
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 40
    assert sum(line.startswith("   done") for line in listed) == len(seeds)


def test_a_single_preset_names_one_command(tmp_path):
    out = tmp_path / "fast"
    for spec in PRESETS["fast"].specs():
        write_fake_run(out, spec, 0.7)
    runner = GridRunner(out, data_dir=DATA_DIR)
    own = GridPart(PRESETS["fast"], tuple(PRESETS["fast"].specs()), "python -m sim.experiments")
    assert report_parts(own, runner) == [own]
    argv = ["--preset", "fast", "--out", str(out), "--report-only"]
    assert main(argv) == EXIT_OK
    table = (out / "table.md").read_text()
    assert f"Made by `python -m sim.experiments --preset fast --out {out}`." in table
    assert "Runs: 4 of 4 complete" in table and "attacker-stake" not in table
    # the presets of other federation sizes share run ids with fast but none of their
    # runs is complete here; a run that did not complete is not reported
    failed = ExperimentSpec("fedavg", "label-flip", 0.3, num_clients=4, num_rounds=2)
    (out / "runs" / failed.run_id / "results.json").write_text(json.dumps({"status": "failed"}))
    assert main(argv) == EXIT_OK
    assert "Runs: 3 of 4 complete" in (out / "table.md").read_text()


# -- the CIFAR-10 path, on generated data in torchvision's layout ----------------------------


def write_fake_cifar10(root, per_batch=60, test=40, seed=0):
    """Write a tiny CIFAR-10 in torchvision's `cifar-10-batches-py` pickle layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = {}
    for name, count in [
        *((f"data_batch_{i}", per_batch) for i in range(1, 6)),
        ("test_batch", test),
    ]:
        batch_labels = rng.integers(0, 10, size=count).tolist()
        data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
        with (folder / name).open("wb") as handle:
            pickle.dump({"data": data, "labels": batch_labels}, handle)
        labels[name] = batch_labels
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({"label_names": names}, handle)
    return labels


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    # torchvision checks each file's md5 against the real CIFAR-10; generated files pass
    # that check by existing, and everything else is torchvision's own reader.
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity",
        lambda fpath, md5=None: os.path.isfile(fpath),
    )
    root = tmp_path / "cifar-data"
    return root, write_fake_cifar10(root)


def test_cifar10_loads_through_the_task_loaders(fake_cifar10):
    root, labels = fake_cifar10
    assert check_data("cifar10", root) == 40
    train = load_split("cifar10", root.resolve(), train=True)
    assert train.images.shape == (300, 3, 32, 32)
    expected = np.concatenate([labels[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(train.labels, expected)
    assert abs(float(train.images.mean())) < 0.5  # normalised, not raw 0..255

    (attacker,) = choose_attackers(2, 0.5, seed=3)
    for partition in (0, 1):
        client = load_client_data(
            "cifar10",
            root.resolve(),
            partition,
            2,
            alpha=0.5,
            seed=3,
            batch_size=16,
            attacker_fraction=0.5,
        )
        images, _ = next(iter(client.train))
        assert images.shape[1:] == (3, 32, 32)
        assert client.is_attacker == (partition == attacker)

    model = build_model("cifar10")
    loss, confusion = evaluate_confusion(
        model, load_test_data("cifar10", root.resolve()), torch.device("cpu")
    )
    assert confusion.sum() == 40 and np.isfinite(loss)
    assert attack_success_rate(confusion) is not None


def test_cifar10_grid_goes_through_the_same_runner(fake_cifar10, tmp_path, capsys):
    root, _ = fake_cifar10
    out = tmp_path / "cifar-grid"
    specs = PRESETS["full"].specs("cifar10")
    assert {s.run_config()["dataset"] for s in specs} == {"cifar10"}
    assert main(["--preset", "full", "--dataset", "cifar10", "--out", str(out), "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert sum(line.strip().startswith("to run  cifar10-") for line in listed) == len(specs)

    # without the data, the grid stops before starting any federation
    missing = tmp_path / "no-cifar-here"
    argv = ["--preset", "fast", "--dataset", "cifar10", "--data-dir", str(missing)]
    assert main([*argv, "--out", str(out)]) == EXIT_USAGE
    assert not (out / "runs").exists()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        check_data("cifar10", missing)


def test_the_table_names_the_command_that_makes_the_runs():
    argv = ["--preset", "full", "--out", "sim/results/full", "--report-only", "--stream"]
    assert _reproducing(argv) == ["--preset", "full", "--out", "sim/results/full"]


# -- end to end: the fast preset, real federations -------------------------------------------


@pytest.mark.slow
def test_fast_preset_runs_end_to_end_and_resumes_without_recomputing(tmp_path):
    # BCSFL's two runs (clean, label-flip 30%): Flower's strategies go through the same
    # runner, and tests/test_e2e.py runs FedAvg for real.
    out = tmp_path / "fast"
    argv = ["--preset", "fast", "--strategies", "bcsfl", "--out", str(out)]
    argv += ["--data-dir", str(DATA_DIR)]
    assert main(argv) == EXIT_OK
    specs = [spec for spec in PRESETS["fast"].specs() if spec.strategy == "bcsfl"]
    results = {s.run_id: out / "runs" / s.run_id / "results.json" for s in specs}
    assert all(path.is_file() for path in results.values())

    rounds_csv = (out / "rounds.csv").read_text().splitlines()
    assert rounds_csv[0].split(",") == list(ROUND_COLUMNS)
    assert len(rounds_csv) - 1 == len(specs) * (PRESETS["fast"].num_rounds + 1)
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) - 1 == len(specs)
    table = (out / "table.md").read_text()
    assert f"Runs: {len(specs)} of {len(specs)} complete" in table
    assert "| BCSFL |" in table
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["accuracy_label-flip.png", "asr_label-flip.png"]
    assert all((out / "figures" / f).read_bytes().startswith(PNG_MAGIC) for f in figures)

    # the BCSFL runs record screening and rollbacks; clean runs learn
    runs = {s.run_id: RunResult.load(s, out / "runs" / s.run_id) for s in specs}
    for run in runs.values():
        summary_row = run.summary()
        assert summary_row["mean_rejected"] is not None
        assert summary_row["rollbacks"] is not None
        if run.spec.attacker_fraction == 0:
            assert summary_row["final_accuracy"] > 0.5
        assert summary_row["wall_s"] > 0
    attacked = [r for r in runs.values() if r.spec.attacker_fraction > 0]
    assert all(r.results["attacker_partitions"] for r in attacked)
    assert "| BCSFL |" in accuracy_pivot(list(runs.values()))

    # second invocation: every run is reused, no results file is rewritten
    stamps = {run_id: path.stat().st_mtime_ns for run_id, path in results.items()}
    logs = {
        run_id: (path.parent / "run.log").stat().st_mtime_ns for run_id, path in results.items()
    }
    assert main(argv) == EXIT_OK
    assert {run_id: path.stat().st_mtime_ns for run_id, path in results.items()} == stamps
    assert {
        run_id: (path.parent / "run.log").stat().st_mtime_ns for run_id, path in results.items()
    } == logs
    runner = GridRunner(out, data_dir=DATA_DIR, launch=CountingLaunch())
    assert runner.run(specs).reused == [s.run_id for s in specs]
    assert runner.launch.calls == []


# -- the consensus / anchoring experiment, on a real anvil ------------------------------------


def test_consensus_experiment_compares_committee_and_all_node_quorums(tmp_path):
    from sim.consensus import run as run_consensus

    out = tmp_path / "consensus"
    written = run_consensus(out, [5, 8], rounds=2, backend="anvil", command="test")
    assert {p.name for p in written} >= {"rounds.csv", "summary.csv", "figure5_latency.png"}
    assert all(p.is_file() for p in written)
    assert (out / "figure6_throughput.png").read_bytes().startswith(PNG_MAGIC)

    with (out / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2  # modes x node counts x rounds
    for row in rows:
        nodes, miners, signatures = int(row["nodes"]), int(row["miners"]), int(row["signatures"])
        if row["mode"] == "committee":
            assert (miners, signatures) == (5, 4)
        else:
            assert miners == nodes and signatures == -(-2 * nodes // 3)
        assert float(row["latency_ms"]) >= float(row["parallel_latency_ms"]) > 0
        assert float(row["latency_ms"]) >= float(row["anchor_ms"]) > 0
    with (out / "summary.csv").open() as handle:
        summary = {(r["mode"], int(r["nodes"])): r for r in csv.DictReader(handle)}
    assert set(summary) == {(m, n) for m in ("committee", "all-nodes") for n in (5, 8)}
    # more signatures to check on chain cost more gas; the committee's does not grow
    assert int(summary[("all-nodes", 8)]["gas_per_round"]) > int(
        summary[("committee", 8)]["gas_per_round"]
    )
    committee_gas = [int(summary[("committee", n)]["gas_per_round"]) for n in (5, 8)]
    assert abs(committee_gas[0] - committee_gas[1]) < 0.01 * committee_gas[0]


def test_seeds_option_repeats_every_cell_per_seed(tmp_path, capsys):
    argv = ["--preset", "full", "--seeds", "1", "2", "--out", str(tmp_path), "--list"]
    assert main(argv) == EXIT_OK
    listed = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(listed) == 2 * 56 == len(set(listed))
    assert {run_id.rsplit("-", 1)[1] for run_id in listed} == {"s1", "s2"}
