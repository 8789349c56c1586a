"""End-to-end DP-SGD federations: the real `flwr run` of the example app with Opacus."""

import pytest
from conftest import DATA_DIR

from bcsfl_vision.launch import FederationFailedError, run_federation

# The slow tier (`pytest -m slow`): .ci/run runs it after the README's fast tier.
pytestmark = pytest.mark.slow


def dp_run(run_dir, budget):
    """Run 2 clients for 2 rounds with DP-SGD at noise 1.0 and the privacy budget ``budget``."""
    return run_federation(
        run_dir,
        num_supernodes=2,
        run_config={
            "num-server-rounds": 2,
            "dp": True,
            "dp-noise-multiplier": 1.0,
            "dp-target-epsilon": budget,
        },
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
    )


def test_a_dp_run_within_its_budget_records_each_rounds_epsilon(tmp_path):
    run = dp_run(tmp_path / "run", 50.0)
    epsilons = [run.results["rounds"][r]["max_dp_epsilon"] for r in ("1", "2")]
    assert 0 < epsilons[0] < epsilons[1] <= 50.0  # spending accumulates, within the budget


def test_a_dp_run_that_would_overspend_is_refused_by_its_clients_and_stopped(tmp_path):
    with pytest.raises(FederationFailedError) as failed:
        dp_run(tmp_path / "run", 0.2)
    message = str(failed.value)
    assert "round 1: every client refused" in message
    assert "above dp-target-epsilon 0.2" in message and "dp-noise-multiplier >= " in message
