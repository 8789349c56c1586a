"""End-to-end on Flower's deployment engine, as ``docs/deployment.md`` documents it.

No simulation and no fakes, on loopback. Each component is its own process, as on
separate machines, and the test makes what an operator makes:

- a CA and the SuperLink's TLS certificate, and one EC key pair per SuperNode;
- the SuperLink with TLS and SuperNode authentication, each node's public key
  registered with ``flwr supernode register`` (which prints the node's id);
- one encrypted Ethereum keystore per SuperNode and one for the operator, and a
  registry that binds each node's address to its node id (``client-registry``);
- anvil, anchored by URL, and ``flwr run <app> loopback`` over TLS.

Besides the three nodes of the federation, a fourth registered SuperNode signs with an
Ethereum key the registry does not hold (BCSFL rejects its reply, saying why), and a
fifth SuperNode, whose key was never registered, is refused by Flower.

Every process is started in its own session and stopped by pid, with its children.
"""

import datetime
import ipaddress
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
from conftest import DATA_DIR, REPO
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from eth_account import Account
from web3 import Web3

from bcsfl_flower.chain.backends import spawn_anvil, stop_anvil
from bcsfl_flower.processes import free_port, port_in_use, terminate_tree
from bcsfl_vision.launch import APP_DIR

# The slow tier (`pytest -m slow`): .ci/run runs it after the README's fast tier.
pytestmark = pytest.mark.slow

NUM_NODES = 3
"""SuperNodes whose replies count; one more signs with an unregistered Ethereum key."""
NUM_ROUNDS = 2
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


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, *, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _tls_files(directory: Path) -> None:
    """Write a CA (``ca.crt``) and the SuperLink's certificate for 127.0.0.1 (``server.*``)."""
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
    )
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bcsfl test CA")])
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    cert = _certificate(server_name, ca_name, server_key.public_key(), ca_key, ca=False)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(_pem_key(server_key))


def _supernode_key(directory: Path, name: str) -> Path:
    """Write a SuperNode's EC key pair (OpenSSH format, as ``ssh-keygen -t ecdsa``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / name
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    (directory / f"{name}.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private


@dataclass(frozen=True)
class Loopback:
    """A running loopback deployment, as the test sees it."""

    env: dict[str, str]
    chain_url: str
    keys: Path
    nodes: dict[str, int]
    """Registered address -> the node id Flower gave its SuperNode's key."""
    impostor: int
    """Node id of the SuperNode that signs with an Ethereum key nobody registered."""
    operator: str
    processes: list[psutil.Process]
    refused_log: Path
    """Log of the SuperNode whose key was never registered with the SuperLink."""


def _register_supernode(public_key: Path, env: dict[str, str]) -> int:
    """Register a SuperNode's public key as docs/deployment.md says; return its node id."""
    registered = subprocess.run(
        [BIN / "flwr", "supernode", "register", public_key, "loopback", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr
    return int(json.loads(registered.stdout)["node-id"])


def _supernode(keys: Path, name: str, port: str, node_config: str) -> list[object]:
    return [
        *(BIN / "flower-supernode", "--superlink", f"127.0.0.1:{port}"),
        *("--root-certificates", keys / "ca.crt"),
        *("--auth-supernode-private-key", keys / name),
        *("--auth-supernode-public-key", keys / f"{name}.pub"),
        *("--port", free_port(), "--node-config", node_config),
    ]


def _node_config(partition: int, keys: Path, keystore: str) -> str:
    return (
        f"partition-id={partition} num-partitions={NUM_NODES + 1} "
        f"bcsfl-keystore='{keys / f'{keystore}.json'}' "
        f"bcsfl-keystore-password-file='{keys / 'password.txt'}'"
    )


@contextmanager
def loopback_deployment(tmp_path: Path) -> Iterator[Loopback]:
    """Run anvil, a TLS SuperLink with SuperNode authentication and five SuperNodes."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "password.txt").write_text(PASSWORD + "\n")
    _tls_files(keys)
    addresses = [_keystore(keys, f"node{i}", f"bcsfl supernode {i}") for i in range(NUM_NODES)]
    _keystore(keys, "unregistered", "bcsfl unregistered signer")
    operator = _keystore(keys, "operator", "bcsfl operator")
    for name in [*(f"node{i}" for i in range(NUM_NODES + 1)), "intruder"]:
        _supernode_key(keys, name)

    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n'
        f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{keys / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Three machines' worth of processes share this one's cores: one PyTorch
        # thread each, or their OpenMP threads wait on each other (see
        # bcsfl_vision.launch.DEFAULT_CLIENT_CPUS).
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
            *(BIN / "flower-superlink", "--port", port),
            *("--ssl-ca-certfile", keys / "ca.crt", "--ssl-certfile", keys / "server.pem"),
            *("--ssl-keyfile", keys / "server.key", "--enable-supernode-auth"),
            *("--database", tmp_path / "superlink.db", "--disable-runtime-dependency-installation"),
        ]
        processes = [stack.enter_context(_process(superlink, tmp_path / "superlink.log", env))]
        _wait_for(lambda: port_in_use(port), "the SuperLink did not listen")
        node_ids = [_register_supernode(keys / f"node{i}.pub", env) for i in range(NUM_NODES + 1)]
        (keys / "registry.json").write_text(
            json.dumps(dict(zip(addresses, node_ids[:-1], strict=True)))
        )
        logs = [tmp_path / f"supernode{i}.log" for i in range(NUM_NODES + 1)]
        for i, log_path in enumerate(logs):
            keystore = f"node{i}" if i < NUM_NODES else "unregistered"
            command = _supernode(keys, f"node{i}", port, _node_config(i, keys, keystore))
            processes.append(stack.enter_context(_process(command, log_path, env)))
        refused_log = tmp_path / "intruder.log"
        intruder = _supernode(keys, "intruder", port, _node_config(0, keys, "node0"))
        processes.append(stack.enter_context(_process(intruder, refused_log, env)))
        _wait_for(
            lambda: all("SuperNode ID" in log_path.read_text() for log_path in logs),
            "the SuperNodes did not all connect",
        )
        nodes = dict(zip(addresses, node_ids, strict=False))
        yield Loopback(env, url, keys, nodes, node_ids[-1], operator, processes, refused_log)


def test_a_tls_deployment_with_authenticated_supernodes_signs_with_their_keys_and_anchors(
    tmp_path,
):
    with loopback_deployment(tmp_path) as deployment:
        results, manifest = _run(deployment, tmp_path / "run")
        refused = deployment.refused_log.read_text()
        started = [(p.pid, p.create_time()) for proc in deployment.processes for p in _family(proc)]
    assert started and not [pid for pid, created in started if _running(pid, created)]

    # Flower refused the SuperNode whose key was never registered: it never got a node id.
    assert "SuperNode ID" not in refused and "Connection attempt failed" in refused
    nodes = {str(node): address for address, node in deployment.nodes.items()}
    for server_round in range(1, NUM_ROUNDS + 1):
        record = results["rounds"][str(server_round)]
        # the three registered nodes signed with their own keys, each from its own node id
        assert record["addresses"] == {node: nodes[node] for node in record["signed"]}
        assert sorted(record["signed"]) == sorted(nodes)
        # the fourth node is authenticated to Flower, but its Ethereum key is not registered
        reason = record["rejected"][str(deployment.impostor)]
        assert "not a registered client" in reason or "not registered" in reason, reason
        assert record["outcome"] == "commit" and record["chain"]["anchored"] is True
        assert set(record["chain"]["signers"]) <= set(deployment.nodes)
    assert results["final_test_accuracy"] > 0.3  # two rounds of three clients; chance is 0.1
    assert manifest["operator"] == deployment.operator  # not the public development key
    assert manifest["rpc_url"] == deployment.chain_url


def test_the_documented_deployment_commands_carry_the_flags_this_test_uses():
    """The test runs what docs/deployment.md says: if a flag leaves the docs, this fails."""
    documented = (REPO / "docs" / "deployment.md").read_text()
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "flwr supernode register",
        "--root-certificates",
        "--auth-supernode-private-key",
        "--auth-supernode-public-key",
        "bcsfl-keystore=",
        "bcsfl-keystore-password-file=",
        "client-registry=",
        "operator-keystore=",
        "operator-keystore-password-file=",
        "root-certificates = ",
    ):
        assert flag in documented, flag


def _run(deployment: Loopback, out: Path) -> tuple[dict, dict]:
    """``flwr run`` the app on the ``loopback`` connection, then ``bcsfl audit verify`` it."""
    keys = deployment.keys
    run_config = (
        f"num-server-rounds={NUM_ROUNDS} chain='{deployment.chain_url}' output-dir='{out}' "
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
    assert f"audit trail OK: {NUM_ROUNDS} anchored and 0 rolled-back rounds" in verify.stdout
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
