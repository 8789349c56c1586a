"""Run a simulated federation with ``flwr run`` and report honestly whether it finished.

``flwr run --stream`` exits 0 even when the ServerApp crashed, it starts a local
SuperLink that keeps running after the run, and offline it must not try to install
the app's dependencies. This launcher takes care of all three so that scripts,
tests and experiments can treat a federation like any other command:

* each run gets its own Flower home (``<output-dir>/flwr-home``) and its own free
  SuperLink ports, so runs never share state;
* the SuperLink and everything it spawned (SuperExec, ServerApp, Ray) is stopped by
  pid when the run ends;
* success is read from the run's own ``results.json``: the exit code is 0 only when
  its status is ``completed``;
* at the end of a BCSFL run, its explorer page (``report.html``, see
  :mod:`bcsfl_flower.audit.explorer`) is written next to ``results.json``;
* how the run was launched is kept in ``<output-dir>/launch.json``, so a stopped run
  can be resumed from its directory alone (run config ``resume``, see
  :mod:`bcsfl_flower.audit.checkpoint`).

Usage::

    python -m bcsfl_vision.launch --num-supernodes 10 --run-config "num-server-rounds=3"
    python -m bcsfl_vision.launch --resume runs/20261130-101500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
from flwr.common.logger import log
from rich.progress import Progress

from bcsfl_flower.processes import free_port, terminate_tree
from bcsfl_vision.config import DATA_DIR_ENV
from bcsfl_vision.progress import FederationProgress, new_progress
from bcsfl_vision.results import RESULTS_FILE, load_results

if TYPE_CHECKING:
    from bcsfl_flower.audit.explorer import WrittenReport

APP_DIR = Path(__file__).resolve().parent.parent
"""The Flower App directory (the one holding ``pyproject.toml``) when run from a checkout."""

SUPERLINK_START_ATTEMPTS = 3
"""Starts of the local SuperLink tried, each on fresh ports (nothing of the run has run
yet when one fails)."""

SUPERLINK_READY_TIMEOUT = 180.0
"""Seconds the launcher waits for the local SuperLink it starts to answer ``/health``.

``flwr run`` starts a local SuperLink itself when none answers, but gives it 15 s: beside
another federation on two cores, three starts in a row missed that (a resume in the slow
tier). The launcher starts it first, the way ``flwr run`` would, and waits on its health
endpoint, so ``flwr run`` finds it running."""

SUPERLINK_START_FAILURE = "Failed to start local SuperLink"
"""What ``flwr run`` prints when its local SuperLink does not start in time."""

DEFAULT_CLIENT_CPUS = 1
"""CPUs Ray reserves per simulated ClientApp unless the caller says otherwise.

Flower reserves 2, and Ray then lets each ClientApp's PyTorch run 2 OpenMP threads.
On a 2-core machine that is one client at a time, and its two threads share the cores
with the SuperLink, the ServerApp and Ray's own processes: every operator waits for its
slower thread, and a small CNN trained 25x slower than on one thread (measured: 10k
MNIST samples, 1.4 s on one thread, 37 s on two beside a busy process). One CPU per
ClientApp runs one single-threaded client per core instead."""

LAUNCH_FILE = "launch.json"
"""How a run was launched (supernodes, run config, data and app directories)."""


class FederationFailedError(RuntimeError):
    """The federation did not finish: its results file is missing or not ``completed``."""


@dataclass(frozen=True)
class FederationRun:
    """Outcome of a finished federation."""

    output_dir: Path
    results: dict[str, Any] | None
    log_path: Path
    flower_status: str | None = None
    report: WrittenReport | None = None
    """The run's explorer page, where one was written."""

    @property
    def results_path(self) -> Path:
        """Return the path of the run's ``results.json``."""
        return self.output_dir / RESULTS_FILE


def run_federation(
    output_dir: Path,
    *,
    num_supernodes: int,
    run_config: Mapping[str, Any] | None = None,
    app_dir: Path = APP_DIR,
    data_dir: Path | None = None,
    timeout: float = 3600.0,
    stream: bool = True,
    require_results: bool = True,
    client_cpus: int = DEFAULT_CLIENT_CPUS,
    progress: Progress | None = None,
    report: bool = True,
) -> FederationRun:
    """Run ``flwr run`` on ``app_dir`` and return its results, or raise if it failed.

    Parameters
    ----------
    output_dir : Path
        Where ``results.json``, the run log and the run's Flower home go. Made absolute,
        and passed to the app as run config ``output-dir``.
    num_supernodes : int
        Number of simulated clients.
    run_config : Mapping[str, Any], optional
        Run-config overrides (kebab-case keys of ``[tool.flwr.app.config]``).
    data_dir : Path, optional
        Data directory handed to the app as ``data-dir``.
    timeout : float
        Seconds after which the run is stopped and counted as failed.
    stream : bool
        Echo the run's log to stdout while it runs (it is always saved to ``run.log``).
    require_results : bool
        Whether the app writes bcsfl's ``results.json`` (this package's ServerApp
        does). For any other Flower app, success is the SuperLink's own run status
        (``flwr ls``), which must be ``finished:completed``.
    client_cpus : int
        CPUs Ray reserves per simulated ClientApp, and the OpenMP threads it lets one
        use (:data:`DEFAULT_CLIENT_CPUS`; Flower's own default is 2).
    progress : rich.progress.Progress, optional
        A live display to follow the run's rounds on (:mod:`bcsfl_vision.progress`):
        round k of N, committed or rolled back, accuracy, anchored, ETA. None shows none.
    report : bool
        Write the run's explorer page (``report.html``) when the run has an audit trail.

    Raises
    ------
    FederationFailedError
        If ``flwr run`` fails, times out, or the results file does not say ``completed``.
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(run_config or {})
    if require_results:
        overrides["output-dir"] = str(output_dir)
    if data_dir is not None:
        overrides["data-dir"] = str(Path(data_dir).resolve())

    launch = {
        "num_supernodes": num_supernodes,
        "run_config": {key: value for key, value in overrides.items() if key != "resume"},
        "app_dir": str(Path(app_dir).resolve()),
        "client_cpus": client_cpus,
    }
    (output_dir / LAUNCH_FILE).write_text(json.dumps(launch, indent=2) + "\n")
    federation = [
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}",
        "--run-config",
        " ".join(f"{key}={_toml_value(value)}" for key, value in overrides.items()),
    ]
    log_path = output_dir / "run.log"
    started = time.monotonic()
    for attempt in range(1, SUPERLINK_START_ATTEMPTS + 1):
        returncode, flower_status, superlink_started = _flwr_run(
            app_dir, federation, output_dir, log_path, timeout, stream, progress
        )
        if superlink_started or attempt == SUPERLINK_START_ATTEMPTS:
            break
        log(WARNING, "The local SuperLink did not start in time (attempt %d); retrying", attempt)
    elapsed = time.monotonic() - started

    if returncode != 0:
        raise FederationFailedError(
            f"`flwr run` exited with {returncode} after {elapsed:.0f}s; see {log_path}"
        )
    if not require_results:
        if flower_status != "finished:completed":
            raise FederationFailedError(
                f"the SuperLink reports the run as {flower_status!r}; see {log_path}"
            )
        return FederationRun(output_dir, None, log_path, flower_status)
    # The app's own record says more than the SuperLink's status (it keeps the error).
    try:
        results = load_results(output_dir)
    except (OSError, ValueError) as err:
        raise FederationFailedError(
            f"the run wrote no readable {RESULTS_FILE} in {output_dir} ({err}); "
            f"SuperLink status {flower_status!r}; see {log_path}"
        ) from err
    if results.get("status") != "completed":
        raise FederationFailedError(
            f"the run did not complete: status {results.get('status')!r}, "
            f"error {results.get('error')!r}; see {log_path}"
        )
    if flower_status in ("finished:failed", "finished:stopped"):
        raise FederationFailedError(
            f"the SuperLink reports the run {flower_status}; see {log_path}"
        )
    page = _write_report(output_dir) if report else None
    return FederationRun(output_dir, results, log_path, flower_status, page)


def _write_report(output_dir: Path) -> WrittenReport | None:
    """Write the run's explorer page; a run without a trail (FedAvg) has none.

    A page that cannot be written does not fail a completed federation: the warning
    says why, and ``bcsfl audit report`` can write it later.
    """
    # Imported here: the audit tools (web3, py-evm) take seconds to import, which a
    # launch with --no-report or a FedAvg run need not pay.
    from bcsfl_flower.audit.explorer import write_report
    from bcsfl_flower.chain.errors import ChainUnavailableError
    from bcsfl_flower.round.notary import MANIFEST_FILE

    manifest = output_dir / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        return write_report(manifest, chain=None)
    except (OSError, ValueError, ChainUnavailableError) as err:
        log(WARNING, "The explorer page was not written: %s", err)
        return None


def _flwr_run(
    app_dir: Path,
    federation: Sequence[str],
    output_dir: Path,
    log_path: Path,
    timeout: float,
    stream: bool,
    progress: Progress | None,
) -> tuple[int, str | None, bool]:
    """Run ``flwr run`` once on fresh ports.

    Returns its exit code, the SuperLink's run status, and whether the local SuperLink
    started at all.
    """
    http_port, control_port = free_port(), free_port()
    env = _run_environment(output_dir / "flwr-home", http_port, control_port)
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "--stream"]
    offset = log_path.stat().st_size if log_path.is_file() else 0
    flower_status = None
    if not start_local_superlink(output_dir / "flwr-home", env, http_port, control_port):
        _stop_superlink(control_port)
        return 1, None, False
    try:
        with _follow(output_dir, progress) as follow:
            returncode = _stream(
                [*command, *federation],
                env,
                log_path,
                timeout,
                stream,
                follow.refresh if follow else None,
            )
        if returncode == 0:
            flower_status = _flower_status(env)
    finally:
        _stop_superlink(control_port)
    with log_path.open("rb") as log_file:
        log_file.seek(offset)
        started = SUPERLINK_START_FAILURE not in log_file.read().decode(errors="replace")
    return returncode, flower_status, started or returncode == 0


def resume_federation(
    run_dir: Path,
    *,
    timeout: float = 3600.0,
    stream: bool = True,
    progress: Progress | None = None,
    report: bool = True,
) -> FederationRun:
    """Resume the stopped run in ``run_dir``, as it was launched, from its last anchored round.

    Raises
    ------
    FederationFailedError
        If ``run_dir`` holds no launched run, the run finished, or the resumed run fails
        (for instance because its audit trail does not verify: the error names the round).
    """
    run_dir = Path(run_dir).resolve()
    try:
        launch = json.loads((run_dir / LAUNCH_FILE).read_text())
    except (OSError, ValueError) as err:
        raise FederationFailedError(f"{run_dir} holds no launched run to resume: {err}") from err
    results = load_results(run_dir) if (run_dir / RESULTS_FILE).is_file() else {}
    if results.get("status") == "completed":
        raise FederationFailedError(f"the run in {run_dir} finished; there is nothing to resume")
    return run_federation(
        run_dir,
        num_supernodes=int(launch["num_supernodes"]),
        run_config={**launch["run_config"], "resume": True},
        app_dir=Path(launch["app_dir"]),
        timeout=timeout,
        stream=stream,
        client_cpus=launch.get("client_cpus") or DEFAULT_CLIENT_CPUS,
        progress=progress,
        report=report,
    )


def _flower_status(env: Mapping[str, str]) -> str | None:
    """Return the run's status as the SuperLink reports it (e.g. ``finished:completed``).

    The run's Flower home holds this run and, for a resumed run, the attempts before it;
    the one submitted last is this one.
    """
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "ls", "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        runs = json.loads(listing.stdout).get("runs", [])
    except ValueError:
        return None
    if not runs:
        return None
    latest = max(runs, key=lambda run: str(run.get("pending-at", "")))
    return str(latest.get("status"))


def _run_environment(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            # Offline: run the app in this environment instead of installing its deps.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            # flwr spawns `flower-superlink` by name: make this environment's win.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def _follow(
    output_dir: Path, progress: Progress | None
) -> contextlib.AbstractContextManager[FederationProgress | None]:
    """Follow the run's rounds on ``progress``; without a display, do nothing."""
    if progress is None:
        return contextlib.nullcontext()
    return FederationProgress(output_dir / RESULTS_FILE, label=output_dir.name, progress=progress)


def _stream(
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    timeout: float,
    echo: bool,
    on_line: Callable[[], object] | None = None,
) -> int:
    deadline = time.monotonic() + timeout
    with log_path.open("a") as log_file:  # a resumed run continues the log
        process = subprocess.Popen(
            command,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert process.stdout is not None
        for line in process.stdout:
            log_file.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if on_line is not None:
                on_line()
            if time.monotonic() > deadline:
                process.kill()
                raise FederationFailedError(f"run exceeded {timeout:.0f}s; see {log_path}")
        return process.wait()


def start_local_superlink(
    flwr_home: Path, env: Mapping[str, str], http_port: int, control_port: int
) -> bool:
    """Start the run's local SuperLink as ``flwr run`` would; return whether it answers.

    Waits up to :data:`SUPERLINK_READY_TIMEOUT` for its ``/health`` endpoint, and gives up
    early if the process exits. The caller stops it (:func:`_stop_superlink`).
    """
    runtime = flwr_home / "local-superlink"
    runtime.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).parent / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--log-file",
        str(runtime / "superlink.log"),
        "--database",
        str(runtime / "state.db"),
    ]
    process = subprocess.Popen(  # stopped by _stop_superlink, found by its control port
        command,
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + SUPERLINK_READY_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2.0).is_success:
                return True
        time.sleep(0.5)
    log(WARNING, "the local SuperLink did not answer on port %d; see %s", http_port, runtime)
    return False


def _stop_superlink(control_port: int) -> None:
    """Stop the SuperLink this run started (found by its control port) and its children."""
    marker = f"127.0.0.1:{control_port}"
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any("flower-superlink" in part for part in cmdline) and marker in cmdline:
            terminate_tree(process)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument(
        "--run-config",
        default="",
        help='space-separated overrides, e.g. "num-server-rounds=3 attacker-fraction=0.3"',
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs") / time.strftime("%Y%m%d-%H%M%S"),
        help="where results.json and the run log go (default: ./runs/<timestamp>)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get(DATA_DIR_ENV, "data")),
        help=f"directory holding MNIST/raw/*.gz (default: ${DATA_DIR_ENV} or ./data)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write the run's explorer page (report.html) at the end",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the stopped run in RUN_DIR from its last anchored round",
    )
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.run_config.split() if item)
    try:
        with new_progress() as display:
            if args.resume is not None:
                run = resume_federation(args.resume, progress=display, report=not args.no_report)
            else:
                run = run_federation(
                    args.output_dir,
                    num_supernodes=args.num_supernodes,
                    run_config={key: _parse_scalar(value) for key, value in overrides.items()},
                    data_dir=args.data_dir,
                    progress=display,
                    report=not args.no_report,
                )
    except FederationFailedError as err:
        print(f"bcsfl: federation FAILED: {err}", file=sys.stderr)
        return 1
    accuracy = (run.results or {}).get("final_test_accuracy")
    print(f"bcsfl: federation completed; final test accuracy {accuracy}")
    print(f"bcsfl: results in {run.results_path}")
    if run.report is not None:
        print(f"bcsfl: explorer page in {run.report.path} (the trail {run.report.verdict})")
    return 0


def _parse_scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text.strip("'\"")


if __name__ == "__main__":
    sys.exit(main())
