"""Connections to the chain that holds the audit trail.

:func:`connect` turns the run config's chain spec into a :class:`ChainConnection`:

``"embedded"`` (the default)
    An in-process EVM (web3's ``EthereumTesterProvider`` over py-evm), nothing to
    install. It lives only as long as the process, so every transaction it mines is
    also appended, signed and raw, to a journal (``embedded-journal.jsonl`` in the
    state directory). Replaying the journal into a fresh embedded chain re-executes
    every transaction, so the contract re-checks every certificate, and rebuilds the
    same contract state and event logs: that is how a run resumes and how the
    ``bcsfl audit`` CLI reads the trail after the run. The journal is evidence only
    because the EVM re-validates it; it is not a consensus-secured chain.
``"anvil"``
    A real anvil node spawned on a free loopback port with ``--state`` pointing into
    the state directory, so the chain (blocks, transactions, logs) is dumped on exit
    and reloaded on the next start. It is stopped by pid in :meth:`ChainConnection.close`.
``"http://..."`` / ``"https://..."``
    Any Ethereum JSON-RPC endpoint; persistence is the node's business.

All transactions are signed locally by the operator account (the contract owner) and
sent raw, so the three backends behave alike.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from flwr.common.logger import log
from hexbytes import HexBytes
from web3 import Web3
from web3.types import TxReceipt

from bcsfl_flower.chain.compiler import repository_root
from bcsfl_flower.chain.errors import ChainUnavailableError
from bcsfl_flower.chain.keys import DEV_MNEMONIC, OPERATOR_DEV_INDEX, dev_account
from bcsfl_flower.packets import to_hex
from bcsfl_flower.processes import free_port, port_in_use

BACKEND_EMBEDDED = "embedded"
BACKEND_ANVIL = "anvil"
BACKEND_HTTP = "http"

ANVIL_ENV = "BCSFL_ANVIL"
"""Environment variable naming the anvil binary, if it is not found automatically."""

JOURNAL_FILE = "embedded-journal.jsonl"
"""Transaction journal of the embedded backend, inside the state directory."""

ANVIL_STATE_FILE = "anvil-state.json"
"""anvil's state dump, inside the state directory."""

ANVIL_LOG_FILE = "anvil.log"
"""anvil's stdout and stderr, inside the state directory."""

_EMBEDDED_HD_PATH = "m/44'/60'/0'/0"  # eth-tester appends "/{index}"; anvil's accounts
_RECEIPT_TIMEOUT_S = 60.0


@dataclass
class ChainConnection:
    """An open connection to a chain, with the operator account that signs transactions.

    Attributes
    ----------
    web3 : Web3
        The web3 instance.
    backend : str
        ``"embedded"``, ``"anvil"`` or ``"http"``.
    operator : LocalAccount
        The account that deploys the contract and sends every transaction.
    state_dir : Path
        Where backend state lives (journal, anvil state, deployment record).
    rpc_url : str | None
        The JSON-RPC URL (anvil and http backends).
    """

    web3: Web3
    backend: str
    operator: LocalAccount
    state_dir: Path
    rpc_url: str | None = None
    _journal: Path | None = None
    _process: subprocess.Popen[bytes] | None = None
    _closed: bool = False
    _chain_id: int | None = field(default=None, repr=False)

    @property
    def chain_id(self) -> int:
        """The chain id (cached after the first query)."""
        if self._chain_id is None:
            self._chain_id = int(self.web3.eth.chain_id)
        return self._chain_id

    @property
    def pid(self) -> int | None:
        """Process id of the spawned anvil, if any."""
        return None if self._process is None else self._process.pid

    def send(self, transaction: dict[str, Any]) -> TxReceipt:
        """Sign ``transaction`` with the operator, send it, and return its receipt.

        ``transaction`` is what web3's ``build_transaction`` returns; the nonce is
        filled in here. The receipt is returned whatever its status; on the embedded
        backend the transaction is journaled once mined (reverted ones too: they still
        consume a nonce, and the replay must reproduce them).
        """
        tx = dict(transaction)
        tx["nonce"] = self.web3.eth.get_transaction_count(self.operator.address, "pending")
        tx.setdefault("chainId", self.chain_id)
        signed = self.operator.sign_transaction(tx)
        tx_hash = self.web3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.web3.eth.wait_for_transaction_receipt(
            tx_hash, timeout=_RECEIPT_TIMEOUT_S, poll_latency=0.05
        )
        if self._journal is not None:
            _append_journal(self._journal, bytes(signed.raw_transaction), receipt)
        return receipt

    def describe(self) -> dict[str, Any]:
        """Return what a reader needs to reach this chain again (for ``chain.json``)."""
        description: dict[str, Any] = {"backend": self.backend, "chain_id": self.chain_id}
        if self.backend == BACKEND_EMBEDDED:
            description["journal"] = str(self.state_dir / JOURNAL_FILE)
        elif self.backend == BACKEND_ANVIL:
            description["anvil_state"] = str(self.state_dir / ANVIL_STATE_FILE)
        else:
            description["rpc_url"] = self.rpc_url
        return description

    def close(self) -> None:
        """Stop what was spawned (anvil: SIGTERM, so it dumps its state, then wait)."""
        if self._closed:
            return
        self._closed = True
        if self._process is not None:
            _stop_process(self._process)

    def __enter__(self) -> ChainConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(
    spec: str,
    state_dir: str | os.PathLike[str],
    *,
    operator: LocalAccount | None = None,
    read_only: bool = False,
    startup_timeout_s: float = 30.0,
) -> ChainConnection:
    """Open the chain named by ``spec``.

    Parameters
    ----------
    spec : str
        ``"embedded"``, ``"anvil"``, or an ``http(s)://`` JSON-RPC URL.
    state_dir : str | os.PathLike
        Directory for backend state; created if missing. An embedded journal or anvil
        state found there is loaded, so a run resumes where it stopped.
    operator : LocalAccount, optional
        The account that signs transactions. Defaults to development account 0, which
        the embedded chain and anvil pre-fund (UNSAFE outside simulation: its key is
        public; pass a keystore account for a real chain).
    read_only : bool, optional
        Load existing state without ever writing it (the CLI): the embedded journal is
        replayed but not appended to, and anvil loads its state without dumping it.
    startup_timeout_s : float, optional
        How long to wait for a spawned anvil or a URL to answer.

    Raises
    ------
    ValueError
        If ``spec`` is not one of the above.
    ChainUnavailableError
        If anvil cannot be started or the URL does not answer.
    """
    if not isinstance(spec, str):
        raise ValueError(f"chain spec must be a string, got {spec!r}")
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    account = operator if operator is not None else dev_account(OPERATOR_DEV_INDEX)
    if spec in (BACKEND_EMBEDDED, BACKEND_ANVIL):
        if spec == BACKEND_EMBEDDED:
            connection = _connect_embedded(directory, account, read_only=read_only)
        else:
            connection = _connect_anvil(directory, account, read_only, startup_timeout_s)
        if not read_only:
            fund_operator(connection)
        return connection
    if spec.startswith(("http://", "https://")):
        if operator is None:
            log(
                WARNING, "Chain %s: signing with the PUBLIC development key (simulation only)", spec
            )
        web3 = Web3(Web3.HTTPProvider(spec, request_kwargs={"timeout": 10}))
        _wait_until_up(web3, spec, startup_timeout_s, process=None)
        return ChainConnection(web3, BACKEND_HTTP, account, directory, rpc_url=spec)
    raise ValueError(f"chain spec must be 'embedded', 'anvil' or an http(s):// URL, got {spec!r}")


# ------------------------------------------------------------------------------------------
# Embedded
# ------------------------------------------------------------------------------------------


OPERATOR_FUNDS_WEI = 10**21
"""What a development chain grants an operator that brings its own key (1000 ether)."""


def fund_operator(connection: ChainConnection) -> None:
    """Fund an operator key of its own on a development chain, from the faucet account.

    The embedded chain and anvil pre-fund only the public development accounts, so a
    simulation that signs with a secret operator key (``operator-keystore``) needs gas
    money first. The transfer is an ordinary transaction from development account 0
    (journaled on the embedded chain, so a reader's replay funds the operator too); it
    is sent only while the operator's balance is below a tenth of the grant.
    """
    operator = connection.operator.address
    if operator == dev_account(OPERATOR_DEV_INDEX).address:
        return
    if connection.web3.eth.get_balance(operator) >= OPERATOR_FUNDS_WEI // 10:
        return
    faucet = dataclasses.replace(connection, operator=dev_account(OPERATOR_DEV_INDEX))
    transfer = {
        "to": operator,
        "value": OPERATOR_FUNDS_WEI,
        "gas": 21_000,
        "gasPrice": connection.web3.eth.gas_price,
    }
    receipt = faucet.send(transfer)
    if receipt["status"] != 1:
        raise ChainUnavailableError(
            f"funding the operator {operator} failed", action="fund", attempts=1, resume={}
        )
    log(INFO, "Funded the operator %s from the development faucet", operator)


def embedded_web3() -> Web3:
    """Return a fresh in-process chain whose pre-funded accounts are anvil's dev accounts."""
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider

    backend = PyEVMBackend(mnemonic=DEV_MNEMONIC, hd_path=_EMBEDDED_HD_PATH)
    return Web3(EthereumTesterProvider(EthereumTester(backend)))


def _connect_embedded(
    directory: Path, account: LocalAccount, *, read_only: bool
) -> ChainConnection:
    web3 = embedded_web3()
    journal = directory / JOURNAL_FILE
    if journal.is_file():
        replayed = replay_journal(web3, journal)
        log(INFO, "Embedded chain: replayed %d transactions from %s", replayed, journal)
    return ChainConnection(
        web3, BACKEND_EMBEDDED, account, directory, _journal=None if read_only else journal
    )


def replay_journal(web3: Web3, journal: Path) -> int:
    """Re-execute a journal's raw transactions, checking each one's hash and status.

    Returns
    -------
    int
        The number of transactions replayed.

    Raises
    ------
    ValueError
        If a line is malformed, or a transaction's hash or status differs from the
        journal's: the journal was edited or belongs to another chain.
    """
    count = 0
    with journal.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                raw = HexBytes(entry["raw"])
                expected_hash, expected_status = entry["hash"], int(entry["status"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{journal}:{number}: malformed journal entry: {err}") from err
            try:
                tx_hash = web3.eth.send_raw_transaction(raw)
                receipt = web3.eth.wait_for_transaction_receipt(tx_hash, timeout=_RECEIPT_TIMEOUT_S)
            except Exception as err:  # any failure means the journal is bad
                raise ValueError(
                    f"{journal}:{number}: replay diverged: the chain refused the transaction: {err}"
                ) from err
            if tx_hash.to_0x_hex() != expected_hash or receipt["status"] != expected_status:
                raise ValueError(
                    f"{journal}:{number}: replay diverged: transaction {tx_hash.to_0x_hex()} "
                    f"status {receipt['status']}, journal says {expected_hash} status "
                    f"{expected_status}"
                )
            count += 1
    return count


def _append_journal(journal: Path, raw: bytes, receipt: TxReceipt) -> None:
    entry = {
        "raw": to_hex(raw),
        "hash": receipt["transactionHash"].to_0x_hex(),
        "status": int(receipt["status"]),
    }
    with journal.open("a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")
        out.flush()
        os.fsync(out.fileno())


# ------------------------------------------------------------------------------------------
# anvil
# ------------------------------------------------------------------------------------------


def find_anvil(*, search_cwd: bool = False) -> Path:
    """Return the path of a native anvil binary.

    Looks at ``$BCSFL_ANVIL``; then the binary that npm's ``@foundry-rs/anvil`` installs
    (``node_modules/@foundry-rs/anvil-<platform>/bin/anvil``) in this checkout and its
    parents, and with ``search_cwd`` in the current directory and its parents; then
    ``anvil`` on ``PATH`` unless it is npm's node wrapper (whose child would outlive it
    when stopped by pid). A run searches its working directory (the SuperLink's, chosen
    by whoever runs it: a ServerApp installed by ``flwr run`` lies outside the checkout);
    a reader never does, since ``bcsfl audit`` is run from untrusted run directories,
    which could ship their own ``node_modules``.

    Raises
    ------
    FileNotFoundError
        If none is found.
    """
    if env := os.environ.get(ANVIL_ENV):
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"${ANVIL_ENV}={env} is not a file")
        return path
    for start in (repository_root(), *([Path.cwd()] if search_cwd else [])):
        for base in (start, *start.parents):
            found = sorted((base / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil"))
            if found:
                return found[0]
    on_path = shutil.which("anvil")
    if on_path is not None and not _is_script(Path(on_path)):
        return Path(on_path)
    raise FileNotFoundError(
        "anvil not found: run `npm install` in the repository root (it installs "
        f"@foundry-rs/anvil), install foundry, or set ${ANVIL_ENV}"
    )


def spawn_anvil(
    *,
    state_file: Path | None = None,
    load_only: bool = False,
    log_file: Path | None = None,
    startup_timeout_s: float = 30.0,
    extra_args: tuple[str, ...] = (),
    binary: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start anvil on a free loopback port and wait until it answers.

    Parameters
    ----------
    state_file : Path, optional
        ``--state`` file (loaded if present, dumped on exit and every second); with
        ``load_only``, passed as ``--load-state`` and never written.
    load_only : bool, optional
        Load ``state_file`` without dumping.
    log_file : Path, optional
        Where anvil's output goes (discarded if not given).
    startup_timeout_s : float, optional
        How long to wait for the RPC to answer.
    extra_args : tuple[str, ...], optional
        More command-line arguments.
    binary : Path, optional
        The anvil to run (default: :func:`find_anvil`).

    Returns
    -------
    tuple[subprocess.Popen, str]
        The process (stop it with :func:`stop_anvil`) and its RPC URL.
    """
    binary = binary or find_anvil()
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        command = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--silent"]
        if state_file is not None:
            if load_only:
                command += ["--load-state", str(state_file)]
            else:
                command += ["--state", str(state_file), "--state-interval", "1"]
        command += list(extra_args)
        output = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if log_file is not None:
                output.close()  # type: ignore[union-attr]  # the log file opened above
        url = f"http://127.0.0.1:{port}"
        web3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 5}))
        try:
            _wait_until_up(web3, url, startup_timeout_s, process=process)
        except ChainUnavailableError:
            stop_anvil(process)
            if process.returncode not in (None, 0) and port_in_use(port):
                continue
            raise
        atexit.register(stop_anvil, process)
        return process, url
    raise ChainUnavailableError(
        "anvil could not bind a free port after 3 attempts",
        action="spawn anvil",
        attempts=3,
        resume={},
    )


def stop_anvil(process: subprocess.Popen[bytes]) -> None:
    """Stop a spawned anvil by pid: SIGTERM (it dumps its state), then SIGKILL."""
    _stop_process(process)


def _connect_anvil(
    directory: Path, account: LocalAccount, read_only: bool, startup_timeout_s: float
) -> ChainConnection:
    state_file = directory / ANVIL_STATE_FILE
    load_only = read_only
    if read_only and not state_file.is_file():
        raise FileNotFoundError(f"no anvil state at {state_file}")
    process, url = spawn_anvil(
        binary=find_anvil(search_cwd=not read_only),
        state_file=state_file,
        load_only=load_only,
        log_file=None if read_only else directory / ANVIL_LOG_FILE,
        startup_timeout_s=startup_timeout_s,
    )
    log(INFO, "Started anvil (pid %d) at %s, state %s", process.pid, url, state_file)
    web3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 10}))
    return ChainConnection(web3, BACKEND_ANVIL, account, directory, rpc_url=url, _process=process)


def _wait_until_up(
    web3: Web3,
    url: str,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        if process is not None and process.poll() is not None:
            raise ChainUnavailableError(
                f"anvil exited with code {process.returncode} before answering at {url}",
                action="connect",
                attempts=attempts,
                resume={"rpc_url": url},
            )
        try:
            if web3.is_connected():
                web3.eth.chain_id  # noqa: B018 - a real request, not just a socket
                return
        except Exception:  # any failure means "not up yet"
            pass
        if time.monotonic() >= deadline:
            raise ChainUnavailableError(
                f"no Ethereum JSON-RPC answer at {url} within {timeout_s:.0f} s",
                action="connect",
                attempts=attempts,
                resume={"rpc_url": url},
            )
        sleep(0.05)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _is_script(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return True
