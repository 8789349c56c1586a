"""The launcher retries a run whose local SuperLink did not start, and nothing else."""

from __future__ import annotations

import json

import pytest

from bcsfl_vision import launch
from bcsfl_vision.launch import FederationFailedError, run_federation


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


def test_each_clientapp_gets_one_cpu_unless_asked_and_a_resume_keeps_it(tmp_path, monkeypatch):
    federations: list[str] = []

    def fake(app_dir, federation, output_dir, log_path, *rest):
        federations.append(federation[federation.index("--federation-config") + 1])
        (output_dir / "results.json").write_text(json.dumps({"status": "failed"}))
        return 0, "finished:completed", True

    monkeypatch.setattr(launch, "_flwr_run", fake)
    for run_dir, cpus in ((tmp_path / "default", None), (tmp_path / "two", 2)):
        with pytest.raises(FederationFailedError):
            run_federation(
                run_dir,
                num_supernodes=3,
                stream=False,
                **({} if cpus is None else {"client_cpus": cpus}),
            )
        with pytest.raises(FederationFailedError):
            launch.resume_federation(run_dir, stream=False)
    assert federations == [
        "num-supernodes=3 client-resources-num-cpus=1",
        "num-supernodes=3 client-resources-num-cpus=1",
        "num-supernodes=3 client-resources-num-cpus=2",
        "num-supernodes=3 client-resources-num-cpus=2",
    ]


def test_the_launcher_starts_the_local_superlink_and_waits_for_its_health(tmp_path):
    """``flwr run`` would give it 15 s; the launcher waits on /health, then stops it by pid."""
    import httpx
    import psutil

    http_port, control_port = launch.free_port(), launch.free_port()
    env = launch._run_environment(tmp_path / "flwr-home", http_port, control_port)
    try:
        assert launch.start_local_superlink(tmp_path / "flwr-home", env, http_port, control_port)
        assert httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).is_success
        (superlink,) = [
            p
            for p in psutil.process_iter(["cmdline"])
            if f"127.0.0.1:{control_port}" in (p.info["cmdline"] or [])
        ]
    finally:
        launch._stop_superlink(control_port)
    assert not superlink.is_running()
    assert (tmp_path / "flwr-home" / "local-superlink" / "superlink.log").is_file()
