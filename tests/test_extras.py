"""Optional extras: a feature whose extra is missing fails at start-up, naming the extra.

The modules are really there in the test environment, so ``find_spec`` is made to
miss them for one test; the wheel test (``test_wheel.py``) checks the same from an
install that truly lacks them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from bcsfl_flower.extras import EXTRAS, MissingExtraError, import_extra, require_extra
from bcsfl_vision.config import ConfigError, RunSettings


@pytest.fixture
def without(monkeypatch):
    """Hide the given top-level modules from ``importlib.util.find_spec``."""

    def hide(*names: str) -> None:
        real = importlib.util.find_spec

        def find_spec(name, *args, **kwargs):
            if name.split(".")[0] in names:
                return None
            return real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return hide


def test_require_extra_names_the_missing_modules_and_the_extra(without):
    require_extra("ckks", "CKKS")  # installed here: nothing to say
    without("opacus")
    with pytest.raises(MissingExtraError) as raised:
        require_extra("dp", "DP-SGD")
    message = str(raised.value)
    assert message.startswith("DP-SGD needs opacus, which")  # torch is there: not named
    assert "pip install 'bcsfl-flower[dp]'" in message
    assert isinstance(raised.value, ImportError)


@pytest.mark.parametrize(
    ("flag", "extra", "module"), [("ckks", "ckks", "tenseal"), ("dp", "dp", "torch")]
)
def test_run_config_asking_for_a_missing_extra_is_refused_at_start_up(without, flag, extra, module):
    without(module)
    with pytest.raises(ConfigError, match=rf"bcsfl-flower\[{extra}\]"):
        RunSettings(**{flag: True})
    RunSettings()  # the plaintext, non-DP default needs neither


def test_import_extra_turns_an_import_error_into_the_extra_to_install():
    with pytest.raises(MissingExtraError, match=r"bcsfl-flower\[ckks\]"):
        import_extra("ckks", "tenseal_that_does_not_exist", "CKKS aggregation")
    assert import_extra("ckks", "tenseal", "CKKS") is sys.modules["tenseal"]


def test_every_extra_lists_modules():
    assert set(EXTRAS) == {"ckks", "dp"}
    assert all(EXTRAS.values())


def test_importing_the_strategy_imports_no_extra():
    code = (
        "import sys\n"
        "from bcsfl_flower.strategy import BCSFL\n"
        "import bcsfl_flower.privacy, bcsfl_flower.client.ckks_app, bcsfl_flower.cli\n"
        "heavy = {'torch', 'tenseal', 'opacus', 'torchvision', 'flwr_datasets'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
