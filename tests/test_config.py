"""The run config is read once into typed settings; bad values name their key."""

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

from bcsfl_flower.round.settings import ROUND_CONSTRAINTS, RoundSettings, SettingError
from bcsfl_flower.strategy import BCSFL
from bcsfl_vision.config import RUN_CONSTRAINTS, ConfigError, RunSettings


def test_defaults_and_overrides():
    settings = RunSettings.from_run_config({"num-server-rounds": 5, "learning-rate": 1})
    assert settings.num_server_rounds == 5
    assert settings.learning_rate == 1.0 and isinstance(settings.learning_rate, float)
    assert settings.dataset == "mnist" and settings.dirichlet_alpha == 0.5


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-server-rounds": "3"}, "num-server-rounds"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha"),
        ({"attacker-fraction": 1.0}, "attacker-fraction"),
        ({"output-dir": "relative/path"}, "output-dir"),
        ({"batch-size": True}, "batch-size"),
        ({"num-validators": 0}, "num-validators"),
        ({"vote-tolerance": -0.1}, "vote-tolerance"),
        ({"outlier-norm-ratio": 0.5}, "outlier-norm-ratio"),
        ({"split-margin": -1.0}, "split-margin"),
        ({"stake-slash": 1.0}, "stake-slash"),
        ({"stake-reward": -1.0}, "stake-reward"),
        ({"selection": "best"}, "selection"),
        ({"initial-stake": "lottery"}, "initial-stake"),
        ({"attacker-stake": -1.0}, "attacker-stake"),
        ({"loss-metric-key": ""}, "loss-metric-key"),
        ({"ckks": True, "selection": "paper"}, "selection"),
        ({"dp-target-epsilon": 8.0}, "dp-target-epsilon"),
        ({"dp": True, "dp-target-epsilon": -1.0}, "dp-target-epsilon"),
        ({"dp": True, "dp-target-epsilon": float("nan")}, "dp-target-epsilon"),
        ({"ckks": True, "strategy": "fedavg"}, "ckks"),
        ({"chain": "none"}, "require-signed"),
        ({"client-registry": "registry.json"}, "client-registry"),
        ({"chain": "http://127.0.0.1:8545"}, "client-registry"),
        ({"chain": "http://127.0.0.1:8545", "operator-keystore": "k.json"}, "operator-keystore"),
        (
            {"chain": "none", "require-signed": False, "operator-keystore": "/keys/op.json"},
            "operator-keystore",
        ),
        (
            {"chain": "http://127.0.0.1:8545", "operator-keystore-password-file": "pw"},
            "operator-keystore-password-file",
        ),
    ],
)
def test_bad_value_fails_fast_naming_the_key(config, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunSettings.from_run_config(config)


def test_unknown_keys_are_ignored_so_user_keys_can_coexist():
    assert RunSettings.from_run_config({"my-own-key": 3}).num_server_rounds == 3


def test_data_dir_falls_back_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BCSFL_DATA_DIR", str(tmp_path))
    assert RunSettings().resolved_data_dir() == tmp_path.resolve()
    assert RunSettings(data_dir="/x/y").resolved_data_dir() == __import__("pathlib").Path("/x/y")


def test_the_pyproject_config_lists_every_setting_with_the_dataclass_default():
    import tomllib

    from bcsfl_vision.launch import APP_DIR

    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    config = app["tool"]["flwr"]["app"]["config"]
    defaults = {
        field.name.replace("_", "-"): field.default for field in dataclasses.fields(RunSettings)
    }
    assert config == defaults
    # and the round keys default to the round settings' own defaults
    assert RunSettings().round_settings() == RoundSettings()
    assert RunSettings.from_run_config({"chain": "none", "require-signed": False}).chain == "none"


def test_every_round_setting_is_a_run_config_key_and_a_read_only_strategy_attribute():
    round_fields = {field.name for field in dataclasses.fields(RoundSettings)} - {"noisy_updates"}
    assert round_fields <= {field.name for field in dataclasses.fields(RunSettings)}
    settings = RunSettings.from_run_config({"stake-ceiling": 3.0, "committee-timeout": 5})
    assert settings.round_settings().stake_policy.ceiling == 3.0
    strategy = BCSFL(settings.round_settings(), num_validators=3)
    assert (strategy.committee_timeout, strategy.num_validators) == (5.0, 3)
    with pytest.raises(AttributeError):
        strategy.num_validators = 4  # type: ignore[misc]


def test_every_setting_has_a_constraint_and_a_bad_value_names_it():
    assert set(RUN_CONSTRAINTS) == {field.name for field in dataclasses.fields(RunSettings)}
    assert set(ROUND_CONSTRAINTS) == {field.name for field in dataclasses.fields(RoundSettings)}
    with pytest.raises(ConfigError, match="run config 'stake-left-out' must be a number in"):
        RunSettings.from_run_config({"stake-left-out": 1.0})
    with pytest.raises(SettingError, match="num_validators must be an int >= 1, got True"):
        RoundSettings(num_validators=True)


def test_dp_turns_on_the_validators_noise_reference():
    assert not RunSettings.from_run_config({}).round_settings().noisy_updates
    assert RunSettings.from_run_config({"dp": True}).round_settings().noisy_updates


def test_a_byzfl_baseline_is_a_strategy_and_needs_byzfl(monkeypatch):
    settings = RunSettings.from_run_config({"strategy": "centered-clipping"})
    assert settings.strategy == "centered-clipping"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "byzfl" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="'centered-clipping' is byzfl's: pip install"):
        RunSettings.from_run_config({"strategy": "centered-clipping"})


def test_a_deployment_refuses_to_register_public_development_keys(tmp_path):
    from flwr.app import Array, ArrayRecord

    from bcsfl_flower.chain.keys import client_dev_account, dev_account
    from bcsfl_vision.server_app import open_notary

    registry = tmp_path / "registry.json"
    own = "0x" + "ab" * 20
    registry.write_text(json.dumps([own, client_dev_account(3).address, dev_account(0).address]))
    settings = RunSettings.from_run_config(
        {"chain": "http://127.0.0.1:9", "client-registry": str(registry)}
    )
    initial = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    with pytest.raises(ValueError, match="public development accounts") as raised:
        open_notary(settings, tmp_path / "run", initial, num_partitions=3)
    assert client_dev_account(3).address in str(raised.value) and own not in str(raised.value)


def test_the_deployment_engine_refuses_to_start_without_a_client_registry(tmp_path):
    from flwr.app import Array, ArrayRecord

    from bcsfl_vision.server_app import open_notary

    initial = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    settings = RunSettings.from_run_config({"chain": "embedded"})
    with pytest.raises(ValueError, match="client-registry is unset on Flower's deployment"):
        open_notary(settings, tmp_path / "run", initial, num_partitions=3, simulated=False)
    assert not (tmp_path / "run").exists()  # refused before any chain or store was made
    notary = open_notary(settings, tmp_path / "sim", initial, num_partitions=3, simulated=True)
    try:
        assert notary is not None and notary.development_keys
        assert notary.signing_config()["bcsfl-development-keys"] is True
    finally:
        notary.connection.close()
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(["0x" + "ab" * 20]))
    deployed = RunSettings.from_run_config({"chain": "embedded", "client-registry": str(registry)})
    notary = open_notary(deployed, tmp_path / "dep", initial, num_partitions=3, simulated=False)
    try:  # the nodes' own keys only: a node without a keystore is told to set one
        assert notary is not None and not notary.development_keys
        assert "bcsfl-development-keys" not in notary.signing_config()
    finally:
        notary.connection.close()
