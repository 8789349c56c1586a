"""End-to-end DP-SGD federations: the real `flwr run` of the example app with Opacus."""

import pytest
from conftest import DATA_DIR

from bcsfl_flower.launch import FederationFailedError, run_federation

DP_RUN = {"num-server-rounds": 2, "dp": True, "dp-noise-multiplier": 1.0}


def test_a_dp_run_within_its_budget_records_each_rounds_epsilon(tmp_path):
    run = run_federation(
        tmp_path / "run",
        num_supernodes=2,
        run_config={**DP_RUN, "dp-target-epsilon": 50.0},
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
    )
    epsilons = [run.results["rounds"][r]["max_dp_epsilon"] for r in ("1", "2")]
    assert 0 < epsilons[0] < epsilons[1] <= 50.0  # spending accumulates, within the budget


def test_a_dp_run_that_would_overspend_is_refused_by_its_clients_and_stopped(tmp_path):
    with pytest.raises(FederationFailedError) as failed:
        run_federation(
            tmp_path / "run",
            num_supernodes=2,
            run_config={**DP_RUN, "dp-target-epsilon": 0.2},
            data_dir=DATA_DIR,
            timeout=900,
            stream=False,
        )
    message = str(failed.value)
    assert "round 1: every client refused" in message
    assert "above dp-target-epsilon 0.2" in message and "dp-noise-multiplier >= " in message
