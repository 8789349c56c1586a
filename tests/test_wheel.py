"""The wheel is what gets tested: built, installed with the core only, used as a user would.

The fixture builds bcsfl-flower's wheel from this checkout, installs it into a fresh
virtualenv with nothing but its core dependencies (plus scikit-learn, which the user's
app below needs for itself), and every test then runs that environment's Python from a
scratch directory, so nothing is imported from the source tree. The example app's
wheel is added without its dependencies, for its launcher (``bcsfl_vision.launch``,
``flwr run`` made offline), which imports neither PyTorch nor anything else the core
lacks. The user's app is
``tests/sklearn_app``: a Flower scikit-learn app written the way Flower's own example is,
with FedAvg swapped for BCSFL and an audit trail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The slow tier (`pytest -m slow`): .ci/run runs it after the README's fast tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sklearn_app"
EXTRA_MODULES = ("torch", "torchvision", "opacus", "tenseal", "flwr_datasets")


def run(command: list[str | Path], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command of the core environment, never from the source tree."""
    return subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> tuple[Path, Path]:
    """Return (the core environment's python, a scratch directory)."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist"]
    built = run([*wheels, REPO, REPO / "examples" / "pytorch-vision"], root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("bcsfl_flower-*.whl")
    (example,) = (root / "dist").glob("bcsfl_vision-*.whl")
    made = run([sys.executable, "-m", "venv", root / "venv"], root)
    assert made.returncode == 0, made.stderr
    python = root / "venv" / "bin" / "python"
    installed = run([python, "-m", "pip", "install", wheel, "scikit-learn"], root)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    launcher = run([python, "-m", "pip", "install", "--no-deps", example], root)
    assert launcher.returncode == 0, launcher.stdout[-2000:] + launcher.stderr[-2000:]
    return python, root


def test_the_core_install_has_no_extra_and_imports_from_the_wheel(core):
    python, root = core
    probe = (
        "import importlib.util, json, bcsfl_flower\n"
        "from bcsfl_flower.strategy import BCSFL\n"
        "from bcsfl_flower.client.mod import bcsfl_client_app\n"
        "from bcsfl_flower.chain.compiler import load_artifact\n"
        f"found = [m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m)]\n"
        "print(json.dumps({'found': found, 'file': bcsfl_flower.__file__,\n"
        "                  'abi': len(load_artifact()['abi'])}))\n"
    )
    out = run([python, "-c", probe], root)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    assert facts["found"] == []  # neither torch nor tenseal (nor opacus, torchvision, ...)
    assert "site-packages" in facts["file"] and str(REPO) not in facts["file"]
    assert facts["abi"] > 0  # the contract artifact is in the wheel


@pytest.mark.parametrize(
    ("code", "extra"),
    [
        ("from bcsfl_flower.strategy import BCSFL; BCSFL(ckks=True)", "ckks"),
        ("import bcsfl_flower.privacy.dp", "dp"),
        ("from bcsfl_flower.privacy import make_private", "dp"),
    ],
)
def test_a_feature_without_its_extra_fails_naming_the_extra(core, code, extra):
    python, root = core
    out = run([python, "-c", code], root)
    assert out.returncode != 0
    assert "MissingExtraError" in out.stderr
    assert f"pip install 'bcsfl-flower[{extra}]'" in out.stderr


def test_a_scikit_learn_app_runs_from_the_core_wheel_and_its_trail_audits(core):
    python, root = core
    app = root / "sklearn_app"
    shutil.copytree(APP, app)
    runs = root / "run"
    federate = (
        "from pathlib import Path\n"
        "from bcsfl_vision.launch import run_federation\n"
        f"out = Path({str(runs)!r})\n"
        f"run = run_federation(out, num_supernodes=4, app_dir=Path({str(app)!r}),\n"
        "    run_config={'output-dir': str(out / 'trail')}, require_results=False,\n"
        "    stream=False, timeout=600, client_cpus=1)\n"
        "print(run.flower_status)\n"
    )
    out = run([python, "-c", federate], root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().endswith("finished:completed")
    log = (runs / "run.log").read_text()
    assert "Starting BCSFL strategy" in log
    assert log.count("consensus: commit") == 3  # validators scored with its evaluate handler

    bcsfl = python.parent / "bcsfl"
    verified = run([bcsfl, "audit", "--run-dir", runs / "trail", "verify"], root)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "audit trail OK: 3 anchored" in verified.stdout
    replayed = run([bcsfl, "audit", "--run-dir", runs / "trail", "replay"], root)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.count("replay OK") == 3
