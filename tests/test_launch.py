"""The launcher retries a run whose local SuperLink did not start, and nothing else."""

from __future__ import annotations

import json

import pytest

from bcsfl_flower import launch
from bcsfl_flower.launch import FederationFailedError, run_federation


@pytest.fixture
def attempts(monkeypatch):
    """Replace the one ``flwr run`` with a script of outcomes; record each call."""
    calls: list[int] = []

    def install(*outcomes: tuple[int, str | None, bool]) -> list[int]:
        def fake(app_dir, federation, output_dir, log_path, *rest):
            calls.append(len(calls) + 1)
            returncode, status, started = outcomes[len(calls) - 1]
            if returncode == 0:
                (output_dir / "results.json").write_text(json.dumps({"status": "completed"}))
            return returncode, status, started

        monkeypatch.setattr(launch, "_flwr_run", fake)
        return calls

    return install


def test_a_superlink_that_does_not_start_is_retried(tmp_path, attempts):
    calls = attempts((1, None, False), (0, "finished:completed", True))
    run = run_federation(tmp_path, num_supernodes=2, stream=False)
    assert calls == [1, 2] and run.results == {"status": "completed"}


def test_a_failed_run_is_not_retried(tmp_path, attempts):
    calls = attempts((1, None, True), (0, "finished:completed", True))
    with pytest.raises(FederationFailedError, match="exited with 1"):
        run_federation(tmp_path, num_supernodes=2, stream=False)
    assert calls == [1]


def test_the_retries_are_bounded(tmp_path, attempts):
    calls = attempts(*[(1, None, False)] * launch.SUPERLINK_START_ATTEMPTS)
    with pytest.raises(FederationFailedError):
        run_federation(tmp_path, num_supernodes=2, stream=False)
    assert len(calls) == launch.SUPERLINK_START_ATTEMPTS
