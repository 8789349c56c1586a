"""The run config is read once into typed settings; bad values name their key."""

import pytest

from bcsfl_flower.config import ConfigError, RunSettings


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
