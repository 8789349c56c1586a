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
