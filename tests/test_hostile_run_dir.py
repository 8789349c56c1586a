"""Auditing an untrusted run directory: it cannot redirect the audit or run its own code.

``bcsfl audit`` is meant to be run by anyone on a copy of a run directory, so the
directory is input from a possible attacker. Two ways it could subvert the audit:

* ``chain.json`` names where the models and the journal are; a path outside the
  directory (absolute, ``..`` or a symbolic link) would verify a pristine copy elsewhere
  while the directory's own models were tampered with;
* a directory that claims the anvil backend and ships ``node_modules/@foundry-rs/anvil-*``
  would have that file executed if the binary were searched from the current directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import audit, make_run

from bcsfl_flower.chain import backends

MARKER = "executed-by-the-audit"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine")
    make_run(directory)
    return directory


def tampered_copy(pristine: Path, destination: Path) -> Path:
    """A copy of the run whose anchored round-1 model is overwritten."""
    shutil.copytree(pristine, destination)
    for model in (destination / "models").glob("*.npz"):
        model.write_bytes(b"tampered")
    assert audit(destination, "verify") == 1
    return destination


def point_manifest(run_dir: Path, key: str, value: str) -> None:
    path = run_dir / "chain.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("form", ["absolute", "dot-dot", "symlink"])
def test_chain_json_cannot_point_verify_at_models_outside_the_run(pristine, tmp_path, capsys, form):
    run_dir = tampered_copy(pristine, tmp_path / "run")
    capsys.readouterr()
    if form == "absolute":
        point_manifest(run_dir, "models", str(pristine / "models"))
    elif form == "dot-dot":
        point_manifest(run_dir, "models", os.path.relpath(pristine / "models", run_dir))
    else:
        (run_dir / "elsewhere").symlink_to(pristine / "models")
        point_manifest(run_dir, "models", "elsewhere")
    assert audit(run_dir, "verify") == 2
    err = capsys.readouterr().err
    assert "'models'" in err and "resolves outside the run directory" in err


def test_chain_json_cannot_point_the_journal_outside_the_run(pristine, tmp_path, capsys):
    run_dir = tampered_copy(pristine, tmp_path / "run")
    capsys.readouterr()
    point_manifest(run_dir, "journal", str(pristine / "chain" / "journal.jsonl"))
    assert audit(run_dir, "replay") == 2
    assert "'journal'" in capsys.readouterr().err


def plant_anvil(run_dir: Path) -> Path:
    """Ship a fake anvil in the run directory that leaves a marker when executed."""
    marker = run_dir / MARKER
    binary = run_dir / "node_modules" / "@foundry-rs" / "anvil-linux-x64" / "bin" / "anvil"
    binary.parent.mkdir(parents=True)
    binary.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    binary.chmod(0o755)
    return marker


@pytest.mark.parametrize("chosen", [[], ["--chain", "anvil"]])
def test_an_audit_run_from_a_hostile_directory_executes_nothing_from_it(tmp_path, chosen):
    run_dir = tmp_path / "run"
    make_run(run_dir, backend="anvil")
    marker = plant_anvil(run_dir)
    env = {k: v for k, v in os.environ.items() if k != "BCSFL_ANVIL"}
    command = [sys.executable, "-m", "bcsfl_flower.cli", "audit", *chosen, "verify"]
    done = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True)
    assert not marker.exists(), "the audit executed a file from the audited directory"
    if chosen:  # the auditor's own anvil read the dump
        assert done.returncode == 0, done.stdout + done.stderr
        assert "audit trail OK" in done.stdout
    else:  # the directory's claim of anvil is printed and refused
        assert done.returncode == 1
        assert "claims backend 'anvil'" in done.stderr


def test_only_a_run_searches_its_working_directory_for_anvil(tmp_path, monkeypatch):
    # The ServerApp that flwr run installs lies outside the checkout; its working
    # directory (the SuperLink's) is where the operator installed anvil.
    workdir = tmp_path / "superlink"
    workdir.mkdir()
    plant_anvil(workdir)
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("BCSFL_ANVIL", raising=False)
    monkeypatch.setattr(backends, "repository_root", lambda: tmp_path / "installed-app")
    planted = workdir / "node_modules" / "@foundry-rs" / "anvil-linux-x64" / "bin" / "anvil"
    assert backends.find_anvil(search_cwd=True) == planted
    with contextlib.suppress(FileNotFoundError):  # no anvil on PATH either
        assert backends.find_anvil(search_cwd=False) != planted  # PATH's
