"""sim/bench_round.py's pieces that need no federation: the log line and the app copies."""

import pytest

from sim.bench_round import (
    BCSFL_LINE,
    FEDAVG_LINE,
    dropin_app_dir,
    edited_copy_of_dropin,
    strategy_wall_s,
)


def test_the_strategy_wall_is_flowers_last_finished_line():
    log = (
        "INFO : Strategy execution finished in 12.50s\n"
        "INFO : Strategy execution finished in 34.25s\n"
    )
    assert strategy_wall_s(log) == 34.25
    with pytest.raises(ValueError, match="Strategy execution finished"):
        strategy_wall_s("INFO : [ROUND 1/5]\n")


def test_fedavg_and_mod_copies_change_exactly_their_line(tmp_path):
    fedavg = dropin_app_dir("dropin", "fedavg", tmp_path / "a")
    server = (fedavg / "dropin_app" / "server_app.py").read_text()
    assert FEDAVG_LINE in server and BCSFL_LINE not in server and "bcsfl_flower" not in server
    modded = dropin_app_dir("dropin-mod", "bcsfl", tmp_path / "b")
    client = (modded / "dropin_app" / "client_app.py").read_text()
    assert "app = bcsfl_client_app()" in client and "ClientApp()" not in client
    assert BCSFL_LINE in (modded / "dropin_app" / "server_app.py").read_text()
    assert dropin_app_dir("dropin", "bcsfl", tmp_path / "c").name == "dropin_app"  # unchanged


def test_a_copy_refuses_an_edit_whose_text_is_gone(tmp_path):
    with pytest.raises(ValueError, match="no longer contains"):
        edited_copy_of_dropin(tmp_path / "x", "server_app.py", {"no such line": "x"})


def test_a_cross_device_summary_counts_rollbacks_and_any_unsampled_stake_that_moved():
    from sim.bench_round import run_summary

    rounds = {
        "0": {"round": 0, "test_accuracy": 0.1, "peak_rss_mb": 900.0},
        "1": {
            "round": 1,
            "clients": {"a": {}},
            "outcome": "commit",
            "stakes_before": {"a": 1.0, "b": 1.0},
            "stakes": {"a": 1.05, "b": 1.0},
            "timing": {"decision_s": 9.0, "committee_s": 9.0},
            "peak_rss_mb": 1000.0,
        },
        "2": {
            "round": 2,
            "clients": {"b": {}},
            "outcome": "rollback",
            "stakes_before": {"a": 1.05, "b": 1.0},
            "stakes": {"a": 0.5, "b": 1.0},  # a was not sampled, yet lost stake
            "timing": {"decision_s": 0.1, "committee_s": 0.4},
            "peak_rss_mb": 1010.0,
        },
    }
    summary = run_summary({"rounds": rounds, "final_test_accuracy": 0.9})
    assert summary == {
        "peak_rss_mb": 1010.0,
        "accuracy": 0.9,
        "rollbacks": 1,
        "decision_s": 0.1,
        "committee_s": 0.4,
        "kept_stakes_broken": 1,
    }
