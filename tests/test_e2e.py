"""End-to-end: the real `flwr run` of the example app, through the launcher.

No fakes: a local SuperLink, Ray-simulated SuperNodes, real MNIST. The launcher
reads the run's own results.json, because `flwr run --stream` exits 0 even when the
ServerApp fails; the second test proves that a broken federation is reported.
"""

import pytest
from conftest import DATA_DIR

from bcsfl_flower.launch import FederationFailedError, run_federation


def test_two_round_federation_on_mnist_completes_above_chance(tmp_path):
    run = run_federation(
        tmp_path / "run",
        num_supernodes=4,
        run_config={"num-server-rounds": 2},
        data_dir=DATA_DIR,
        timeout=900,
        stream=False,
    )
    results = run.results
    assert results["status"] == "completed"
    assert set(results["rounds"]) == {"0", "1", "2"}
    for rnd in ("1", "2"):
        assert len(results["rounds"][rnd]["accepted"]) == 4
        assert results["rounds"][rnd]["rejected"] == {}
    assert results["final_test_accuracy"] > 0.5  # chance is 0.1


def test_a_failing_federation_is_reported_as_failed(tmp_path):
    with pytest.raises(FederationFailedError, match="did not complete.*not found in data"):
        run_federation(
            tmp_path / "run",
            num_supernodes=2,
            run_config={"num-server-rounds": 1},
            data_dir=tmp_path / "no-mnist-here",
            timeout=600,
            stream=False,
        )
