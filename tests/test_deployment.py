"""End-to-end on Flower's deployment engine: one SuperLink and three SuperNodes on loopback.

No simulation and no fakes. Each component is its own process, as on separate machines
(``--insecure`` only because everything is on 127.0.0.1):

- each SuperNode loads its own encrypted keystore (node config ``bcsfl-keystore``), so
  the bcsfl mod signs its packets and mines with that key;
- the ServerApp anchors on an anvil chain by URL, sending transactions from its own
  operator keystore, and registers only the nodes' addresses (``client-registry``);
- ``flwr run <app> loopback`` targets a ``[superlink.loopback]`` connection.

Every process is started in its own session and stopped by pid, with its children.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import DATA_DIR
from eth_account import Account
from web3 import Web3

from bcsfl_flower.chain.backends import spawn_anvil, stop_anvil
from bcsfl_flower.launch import APP_DIR
from bcsfl_flower.processes import free_port, port_in_use, terminate_tree

# The slow tier (`pytest -m slow`): .ci/run runs it after the README's fast tier.
pytestmark = pytest.mark.slow

NUM_NODES = 3
PASSWORD = "loopback-only"
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 1800.0  # 2 min on an idle 2-core machine; 12 min measured under heavy load
BIN = Path(sys.executable).parent


def _keystore(directory: Path, name: str, seed: str) -> str:
    """Write an encrypted keystore for a fixed test key and return its address."""
    account = Account.from_key(Web3.keccak(text=seed))
    keyfile = Account.encrypt(account.key, PASSWORD, kdf="pbkdf2", iterations=1000)
    (directory / f"{name}.json").write_text(json.dumps(keyfile))
    return account.address


@contextmanager
def _process(
    command: list[object], log_path: Path, env: dict[str, str]
) -> Iterator[psutil.Process]:
    """Run ``command`` in its own session; on exit stop it and its children by pid."""
    with log_path.open("w") as log_file:
        popen = subprocess.Popen(
            [str(part) for part in command],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    process = psutil.Process(popen.pid)
    try:
        yield process
    finally:
        terminate_tree(process)
        popen.wait(timeout=30)


def _wait_for(condition, what: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.5)


@dataclass(frozen=True)
class Loopback:
    """A running loopback deployment, as the test sees it."""

    env: dict[str, str]
    chain_url: str
    keys: Path
    nodes: list[str]
    operator: str
    processes: list[psutil.Process]


@contextmanager
def loopback_deployment(tmp_path: Path) -> Iterator[Loopback]:
    """Run anvil, a SuperLink and three SuperNodes with their own keystores, on loopback."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "password.txt").write_text(PASSWORD + "\n")
    nodes = [_keystore(keys, f"node{i}", f"bcsfl supernode {i}") for i in range(NUM_NODES)]
    operator = _keystore(keys, "operator", "bcsfl operator")
    (keys / "registry.json").write_text(json.dumps(nodes))

    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Three machines' worth of processes share this one's cores: one PyTorch
        # thread each, or their OpenMP threads wait on each other (see
        # bcsfl_flower.launch.DEFAULT_CLIENT_CPUS).
        "OMP_NUM_THREADS": "1",
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
    }
    with ExitStack() as stack:
        anvil, url = spawn_anvil(log_file=tmp_path / "anvil.log")
        stack.callback(stop_anvil, anvil)
        Web3(Web3.HTTPProvider(url)).provider.make_request(
            "anvil_setBalance", [operator, hex(10**21)]
        )
        superlink = [
            *(BIN / "flower-superlink", "--insecure", "--port", port),
            *("--database", tmp_path / "superlink.db", "--disable-runtime-dependency-installation"),
        ]
        processes = [stack.enter_context(_process(superlink, tmp_path / "superlink.log", env))]
        _wait_for(lambda: port_in_use(port), "the SuperLink did not listen")
        logs = [tmp_path / f"supernode{i}.log" for i in range(NUM_NODES)]
        for i, log_path in enumerate(logs):
            node_config = (
                f"partition-id={i} num-partitions={NUM_NODES} "
                f"bcsfl-keystore='{keys / f'node{i}.json'}' "
                f"bcsfl-keystore-password-file='{keys / 'password.txt'}'"
            )
            supernode = [
                *(BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}"),
                *("--port", free_port(), "--node-config", node_config),
            ]
            processes.append(stack.enter_context(_process(supernode, log_path, env)))
        _wait_for(
            lambda: all("SuperNode ID" in log_path.read_text() for log_path in logs),
            "the SuperNodes did not all connect",
        )
        yield Loopback(env, url, keys, nodes, operator, processes)


def test_a_deployment_of_three_supernodes_signs_with_their_keys_and_anchors(tmp_path):
    with loopback_deployment(tmp_path) as deployment:
        results, manifest = _run_one_round(deployment, tmp_path / "run")
        started = [(p.pid, p.create_time()) for proc in deployment.processes for p in _family(proc)]
    assert started and not [pid for pid, created in started if _running(pid, created)]

    nodes = set(deployment.nodes)
    record = results["rounds"]["1"]
    # every node's reply was admitted: require-signed is on and only the nodes' keystore
    # addresses are registered, so each was signed by its node's own key
    assert len(record["signed"]) == NUM_NODES and record["rejected"] == {}
    assert record["outcome"] == "commit"
    assert record["chain"]["anchored"] is True
    assert set(record["chain"]["signers"]) <= nodes  # the miners signed with their keys
    # One round of three clients ends near 0.5 (0.497 with training weights capped at the
    # median client's count); chance is 0.1.
    assert results["final_test_accuracy"] > 0.3
    assert manifest["operator"] == deployment.operator  # not the public development key
    assert manifest["rpc_url"] == deployment.chain_url


def _run_one_round(deployment: Loopback, out: Path) -> tuple[dict, dict]:
    """``flwr run`` the app on the ``loopback`` connection, then ``bcsfl audit verify`` it."""
    keys = deployment.keys
    run_config = (
        f"num-server-rounds=1 chain='{deployment.chain_url}' output-dir='{out}' "
        f"data-dir='{DATA_DIR.resolve()}' client-registry='{keys / 'registry.json'}' "
        f"operator-keystore='{keys / 'operator.json'}' "
        f"operator-keystore-password-file='{keys / 'password.txt'}'"
    )
    flwr_run = subprocess.run(
        [BIN / "flwr", "run", APP_DIR, "loopback", "--stream", "--run-config", run_config],
        env={**deployment.env, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert flwr_run.returncode == 0, flwr_run.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")
    verify = subprocess.run(
        [BIN / "bcsfl", "audit", "verify", "--run-dir", out, "--chain", deployment.chain_url],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit trail OK: 1 anchored and 0 rolled-back rounds" in verify.stdout
    return results, json.loads((out / "chain.json").read_text())


def _family(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def _running(pid: int, created: float) -> bool:
    """Return whether the process started at ``created`` still runs (pids are reused)."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
