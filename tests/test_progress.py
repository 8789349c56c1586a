"""The live progress display follows a run through its results file."""

import io
import json
import os

from rich.console import Console
from rich.progress import Progress

from bcsfl_vision.progress import FederationProgress, RoundReport, latest_round


def _quiet_display() -> Progress:
    return Progress(console=Console(file=io.StringIO()))


def _write(path, results, mtime):
    path.write_text(json.dumps(results))
    os.utime(path, (mtime, mtime))  # distinct mtimes, whatever the filesystem's resolution


BCSFL_ROUND = {"outcome": "rollback", "test_accuracy": 0.91234, "chain": {"anchored": False}}


def test_the_last_bcsfl_round_is_reported_with_its_decision_and_anchor():
    results = {
        "rounds": {"0": {"test_accuracy": 0.1}, "1": {"outcome": "commit"}, "2": BCSFL_ROUND}
    }
    report = latest_round(results)
    assert report == RoundReport(2, "rollback", 0.91234, anchored=False)
    assert report.describe() == "round 2: rollback, acc 0.9123, not anchored"


def test_a_flower_strategy_round_has_no_decision_and_no_chain():
    report = latest_round({"rounds": {"10": {"test_accuracy": 0.5}, "9": {"test_accuracy": 0.4}}})
    assert report == RoundReport(10, None, 0.5, None)
    assert report.describe() == "round 10: aggregated, acc 0.5000"


def test_before_the_first_round_there_is_nothing_to_report():
    assert latest_round({}) is None
    assert latest_round({"rounds": {"0": {"test_accuracy": 0.1}, "final": {}}}) is None


def test_the_bar_moves_when_the_results_file_changes_and_skips_a_half_written_one(tmp_path):
    path = tmp_path / "results.json"
    display = _quiet_display()
    follower = FederationProgress(path, label="run", progress=display)
    (task,) = display.tasks
    assert follower.refresh() is None and task.completed == 0  # no file yet

    results = {"run_config": {"num-server-rounds": 5}, "rounds": {"1": {"outcome": "commit"}}}
    _write(path, results, mtime=1_000)
    assert follower.refresh().server_round == 1
    assert (task.completed, task.total, task.description) == (1, 5, "round 1: commit")

    path.write_text('{"rounds": {"2"')  # caught mid-write
    os.utime(path, (2_000, 2_000))
    assert follower.refresh().server_round == 1 and task.completed == 1

    results["rounds"]["2"] = BCSFL_ROUND
    _write(path, results, mtime=3_000)
    assert follower.refresh().outcome == "rollback"
    assert task.completed == 2 and "not anchored" in task.description


def test_a_shared_display_hides_the_run_bar_when_the_run_ends(tmp_path):
    display = _quiet_display()
    with FederationProgress(tmp_path / "results.json", total_rounds=3, progress=display):
        assert display.tasks[0].total == 3 and display.tasks[0].visible
    assert not display.tasks[0].visible
