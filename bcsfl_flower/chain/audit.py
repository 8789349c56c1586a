"""Binding to the ``BCSFLAudit`` contract: deploy or attach, register, anchor, read back.

A round's life on chain, as the strategy drives it::

    trail = AuditTrail.open(connection, genesis_hash=model_hash(initial_arrays))
    trail.register_clients({address: stake, ...})
    approval = trail.prepare_approval(round, model_hash, accepted_root, committee, state_root)
    # ... miners sign ``approval`` (see bcsfl_flower.client.mod) ...
    certificate = AnchorCertificate.build(approval, committee, signatures, trail.domain)
    anchored = trail.anchor_round(certificate)
    # or: rollback = trail.prepare_rollback(round, committee, state_root, reason), signed
    rolled = trail.record_rollback(AnchorCertificate.build(rollback, ...))

The contract stores only its rolling head (the last anchored model hash and the round
counters); every round's fields are read back from its events (:meth:`anchored_rounds`,
:meth:`get_round`, :meth:`get_blockchain`).

A transaction that fails to reach the chain is retried with exponential backoff
(:mod:`~bcsfl_flower.chain.retry`). A round is reported anchored only once its
transaction has a successful receipt carrying the contract's ``RoundAnchored`` event.
If the chain stays down, :class:`~bcsfl_flower.chain.errors.ChainUnavailableError` is
raised with the pending statement, and the run must stop: a round is never skipped
silently. A contract revert is not retried (it would revert again) and raises
:class:`~bcsfl_flower.chain.errors.ChainRejectedError` naming the custom error.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any, cast

from eth_utils import is_address, to_checksum_address
from flwr.common.logger import log
from web3.contract import Contract
from web3.types import TxReceipt

from bcsfl_flower.approvals import (
    ROLLBACK_REASON_LIMIT,
    RoundApproval,
    RoundRollback,
    committee_root,
    rollback_reason,
)
from bcsfl_flower.chain.backends import ChainConnection
from bcsfl_flower.chain.certificates import AnchorCertificate, AnchoredRound, RolledBackRound
from bcsfl_flower.chain.compiler import load_artifact
from bcsfl_flower.chain.errors import ChainRejectedError, RoundNotAnchoredError
from bcsfl_flower.chain.retry import (
    RetryPolicy,
    retry_transient,
    send_with_retries,
)
from bcsfl_flower.packets import (
    SIGNATURE_BYTES,
    Eip712Domain,
    check_hash,
    to_hex,
)

DEPLOYMENT_FILE = "deployment.json"
"""Record of the deployed contract, in the connection's state directory."""

MANIFEST_FORMAT = "bcsfl-chain/1"
"""Value of ``format`` in ``chain.json``."""

_REGISTER_BATCH = 100
_ROUND_GAS_LIMIT = 1_000_000  # >= 10x an anchor with 5 miners; only gas used is paid
_REGISTER_GAS_PER_CLIENT = 60_000
_BASE_GAS_LIMIT = 100_000
# eth_estimateGas undershoots the deployment (measured: the estimate runs out of gas on
# anvil), so it carries a fixed limit about twice what it uses (1.45M).
_DEPLOY_GAS_LIMIT = 3_000_000


class AuditTrail:
    """A deployed ``BCSFLAudit`` contract, driven by the connection's operator.

    Use :meth:`open` (deploy once, attach afterwards), :meth:`deploy` or :meth:`attach`.

    Parameters
    ----------
    connection : ChainConnection
        The open chain connection; its operator must be the contract's owner to write.
    address : str
        The contract's address.
    deploy_block : int, optional
        Block of the deployment; events are searched from there.
    retry : RetryPolicy, optional
        Backoff for transactions that do not reach the chain.
    sleep : Callable[[float], None], optional
        Injectable for tests; default :func:`time.sleep`.
    """

    def __init__(
        self,
        connection: ChainConnection,
        address: str,
        *,
        deploy_block: int = 0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.connection = connection
        self.abi: list[dict[str, Any]] = load_artifact()["abi"]
        self.address = to_checksum_address(address)
        self.contract: Contract = connection.web3.eth.contract(address=self.address, abi=self.abi)
        self.deploy_block = deploy_block
        self._head_block = deploy_block
        """Block of the last head :meth:`head` read: later reads scan the logs from there."""
        self.retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        run = bytes(self._read("runId", self.contract.functions.runId().call))
        self.domain = Eip712Domain(connection.chain_id, self.address, run)

    # -- deployment ------------------------------------------------------------------------

    @classmethod
    def deploy(
        cls,
        connection: ChainConnection,
        genesis_hash: bytes,
        *,
        operator_certifies: bool = False,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AuditTrail:
        """Deploy a new contract owned by the operator, starting from ``genesis_hash``.

        The run's identity (the contract's ``runId``) mixes in a fresh random salt, so
        no two deployments share one even at the same address on the same chain.
        ``operator_certifies`` lets the operator certify rounds alone (a federation
        whose clients cannot sign); it is fixed for the contract's life. The deployment
        is recorded in ``<state_dir>/deployment.json`` so that :meth:`open` attaches to
        it next time.
        """
        check_hash("genesis_hash", genesis_hash)
        if genesis_hash == bytes(32):
            raise ValueError("genesis_hash is zero: the contract needs the initial model's hash")
        artifact = load_artifact()
        factory = connection.web3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        operator = connection.operator.address
        receipt = send_with_retries(
            "deploy BCSFLAudit",
            lambda: connection.send(
                factory.constructor(
                    genesis_hash, secrets.token_bytes(32), operator_certifies
                ).build_transaction({"from": operator, "gas": _DEPLOY_GAS_LIMIT})
            ),
            retry if retry is not None else RetryPolicy(),
            sleep,
            resume={"genesis_hash": to_hex(genesis_hash)},
            abi=artifact["abi"],
        )
        address = receipt["contractAddress"]
        if address is None:
            raise ChainRejectedError(
                "the deployment receipt names no contract address", error_name=None, arguments={}
            )
        trail = cls(
            connection,
            address,
            deploy_block=int(receipt["blockNumber"]),
            retry=retry,
            sleep=sleep,
        )
        record = {
            "chain_id": connection.chain_id,
            "contract": trail.address,
            "deploy_tx": receipt["transactionHash"].to_0x_hex(),
            "deploy_block": trail.deploy_block,
            "genesis_hash": to_hex(genesis_hash),
            "operator": operator,
        }
        _write_json(connection.state_dir / DEPLOYMENT_FILE, record)
        log(INFO, "Deployed BCSFLAudit at %s (chain %d)", trail.address, connection.chain_id)
        return trail

    @classmethod
    def attach(
        cls,
        connection: ChainConnection,
        address: str,
        *,
        deploy_block: int = 0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AuditTrail:
        """Attach to an existing contract.

        Raises
        ------
        ValueError
            If no contract code exists at ``address`` on this chain.
        """
        if not is_address(address):
            raise ValueError(f"contract address {address!r} is not an address")
        if not connection.web3.eth.get_code(to_checksum_address(address)):
            raise ValueError(f"no contract at {address} on chain {connection.chain_id}")
        return cls(connection, address, deploy_block=deploy_block, retry=retry, sleep=sleep)

    @classmethod
    def open(
        cls,
        connection: ChainConnection,
        genesis_hash: bytes,
        *,
        operator_certifies: bool = False,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AuditTrail:
        """Attach to the contract recorded in the state directory, or deploy one.

        Raises
        ------
        ValueError
            If the recorded contract has another genesis hash or chain id, or another
            ``operator_certifies``: the state directory belongs to another run.
        """
        record_path = connection.state_dir / DEPLOYMENT_FILE
        if not record_path.is_file():
            return cls.deploy(
                connection,
                genesis_hash,
                operator_certifies=operator_certifies,
                retry=retry,
                sleep=sleep,
            )
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if int(record["chain_id"]) != connection.chain_id:
            raise ValueError(
                f"{record_path} is for chain {record['chain_id']}, connected to "
                f"{connection.chain_id}"
            )
        trail = cls.attach(
            connection,
            record["contract"],
            deploy_block=int(record["deploy_block"]),
            retry=retry,
            sleep=sleep,
        )
        recorded = trail.genesis_hash()
        if recorded != genesis_hash:
            raise ValueError(
                f"contract {trail.address} starts from genesis 0x{recorded.hex()}, not "
                f"0x{genesis_hash.hex()}: {connection.state_dir} belongs to another run"
            )
        if trail.operator_certifies() != operator_certifies:
            raise ValueError(
                f"contract {trail.address} was deployed with operatorCertifies="
                f"{trail.operator_certifies()}, this run asks for {operator_certifies}"
            )
        log(
            INFO, "Attached to BCSFLAudit at %s, last round %d", trail.address, trail.latest_round()
        )
        return trail

    # -- registration ----------------------------------------------------------------------

    def register_clients(self, stakes: Mapping[str, int]) -> int:
        """Register the clients in ``stakes`` that are not registered yet.

        Idempotent, so a resumed run can call it again. Registration is batched
        (one transaction per 100 clients).

        Returns
        -------
        int
            How many clients were newly registered.
        """
        pending: dict[str, int] = {}
        for address, stake in stakes.items():
            if not is_address(address):
                raise ValueError(f"client address {address!r} is not an address")
            if isinstance(stake, bool) or not isinstance(stake, int) or not 0 <= stake < 2**96:
                raise ValueError(f"stake of {address} must be an int in [0, 2**96), got {stake!r}")
            checksummed = to_checksum_address(address)
            if not self.is_registered(checksummed):
                pending[checksummed] = stake
        items = list(pending.items())
        for start in range(0, len(items), _REGISTER_BATCH):
            batch = items[start : start + _REGISTER_BATCH]
            addresses = [address for address, _ in batch]
            amounts = [stake for _, stake in batch]
            self._transact(
                "registerClients",
                functools.partial(self.contract.functions.registerClients, addresses, amounts),
                gas=_BASE_GAS_LIMIT + _REGISTER_GAS_PER_CLIENT * len(batch),
                resume={"clients": addresses, "stakes": amounts},
            )
        return len(items)

    def is_registered(self, address: str) -> bool:
        """Return whether ``address`` is registered."""
        return bool(self.contract.functions.isRegistered(to_checksum_address(address)).call())

    def client_count(self) -> int:
        """Return the number of registered clients."""
        return int(self.contract.functions.clientCount().call())

    # -- rounds ----------------------------------------------------------------------------

    def latest_round(self) -> int:
        """Return the last recorded round, anchored or rolled back (0 before any)."""
        return int(self._read("latestRound", self.contract.functions.latestRound().call))

    def head(self) -> tuple[int, bytes]:
        """Return the last anchored round and its model hash (the genesis before any).

        The paper's ``getLatestModel``, served from the last ``RoundAnchored`` event and
        checked against the contract's head (which keeps only a digest of the hash).

        Raises
        ------
        RuntimeError
            If the events disagree with the contract's head (a node serving partial logs).
        """
        return cast("tuple[int, bytes]", self._read("getLatestModel", lambda: self._read_head()))

    def _read_head(self) -> tuple[int, bytes]:
        # Scan from the block of the head read last (its own event included), not from
        # deployment: every round reads the head, and the trail only grows.
        events = self.contract.events.RoundAnchored.get_logs(from_block=self._head_block)
        if events:
            last = max(events, key=lambda event: int(event["args"]["round"]))
            head = int(last["args"]["round"]), bytes(last["args"]["modelHash"])
            head_block = int(last["blockNumber"])
        else:
            head = 0, bytes(self.contract.functions.genesisModelHash().call())
            head_block = self.deploy_block
        if not self.contract.functions.isLatestModel(head[1]).call():
            raise RuntimeError(
                f"round {head[0]}'s model 0x{head[1].hex()} is the last anchored one in the "
                f"events of {self.address}, but not its head: the node serves partial logs"
            )
        self._head_block = head_block
        return head

    def operator_certifies(self) -> bool:
        """Return whether the operator may certify rounds alone, fixed at deployment."""
        return bool(
            self._read("operatorCertifies", self.contract.functions.operatorCertifies().call)
        )

    def genesis_hash(self) -> bytes:
        """Return the initial model's hash (round 0), fixed at deployment."""
        return bytes(
            self._read("genesisModelHash", self.contract.functions.genesisModelHash().call)
        )

    def get_round(self, round_number: int) -> bytes:
        """Return the model hash anchored for ``round_number`` (0 is the genesis).

        Served from the round's ``RoundAnchored`` event: the contract keeps only its head.

        Raises
        ------
        RoundNotAnchoredError
            If the round has no anchor (it rolled back or has not run).
        """
        if round_number == 0:
            return self.genesis_hash()
        events = self.contract.events.RoundAnchored.get_logs(
            from_block=self.deploy_block, argument_filters={"round": round_number}
        )
        if not events:
            raise RoundNotAnchoredError(f"round {round_number} is not anchored")
        return bytes(events[0]["args"]["modelHash"])

    def get_blockchain(
        self, from_round: int = 0, to_round: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Return the anchored ``(round, model hash)`` pairs in ``[from_round, to_round]``.

        The paper's ``getBlockchain`` read, served from the ``RoundAnchored`` events as
        Ethereum applications serve history; the genesis is round 0. Rolled-back rounds
        are skipped (see :meth:`rollbacks`).
        """
        last = self.latest_round() if to_round is None else to_round
        chain = [(0, self.genesis_hash())] if from_round == 0 else []
        for event in self.contract.events.RoundAnchored.get_logs(from_block=self.deploy_block):
            number = int(event["args"]["round"])
            if from_round <= number <= last:
                chain.append((number, bytes(event["args"]["modelHash"])))
        return sorted(chain)

    def round_count(self) -> int:
        """Return the number of anchored rounds (not counting the genesis)."""
        return len(self.contract.events.RoundAnchored.get_logs(from_block=self.deploy_block))

    def prepare_approval(
        self,
        round_number: int,
        model_hash: bytes,
        accepted_root: bytes,
        committee: Iterable[str],
        state_root: bytes = bytes(32),
        *,
        timestamp: int | None = None,
    ) -> RoundApproval:
        """Return the statement miners sign for ``round_number``, linked to the chain head.

        ``previous_hash`` is read from the contract and ``committee_root`` computed from
        ``committee``; ``state_root`` is the hash of the round's state statement (zero
        when none is kept); ``timestamp`` defaults to now.
        """
        _, previous = self.head()
        return RoundApproval(
            round=round_number,
            model_hash=model_hash,
            previous_hash=previous,
            accepted_root=accepted_root,
            committee_root=committee_root(committee),
            state_root=state_root,
            timestamp=int(time.time()) if timestamp is None else timestamp,
        )

    def prepare_rollback(
        self,
        round_number: int,
        committee: Iterable[str],
        state_root: bytes = bytes(32),
        reason: str = "",
    ) -> RoundRollback:
        """Return the rollback miners sign for ``round_number``, keeping the chain head.

        ``reason`` is cut to what a rollback records
        (:func:`~bcsfl_flower.approvals.rollback_reason`).
        """
        _, kept = self.head()
        return RoundRollback(
            round_number, kept, committee_root(committee), state_root, rollback_reason(reason)
        )

    def anchor_round(self, certificate: AnchorCertificate) -> AnchoredRound:
        """Anchor a round with its certificate and return it once the receipt confirms.

        Raises
        ------
        ChainRejectedError
            If the contract reverts (e.g. ``UnexpectedRound``, ``BrokenHashLink``,
            ``QuorumNotReached``, ``SignerNotInCommittee``, ``SignaturesNotSorted``).
        ChainUnavailableError
            If the chain does not answer after :attr:`retry` attempts; ``resume`` holds
            the certificate to re-send.
        """
        approval = certificate.approval
        if not isinstance(approval, RoundApproval):
            raise TypeError("anchor_round needs a RoundApproval's certificate")

        def already_anchored() -> TxReceipt | None:
            # A previous attempt may have landed even though its receipt was lost.
            if self._recorded_round() < approval.round:
                return None
            events = self.contract.events.RoundAnchored.get_logs(
                from_block=self.deploy_block, argument_filters={"round": approval.round}
            )
            for event in events:
                if bytes(event["args"]["modelHash"]) == approval.model_hash:
                    return self.connection.web3.eth.get_transaction_receipt(
                        event["transactionHash"]
                    )
            return None

        receipt = self._transact(
            f"anchorRound({approval.round})",
            lambda: self.contract.functions.anchorRound(
                approval.as_contract_tuple(),
                list(certificate.committee),
                certificate.packed_signatures,
            ),
            gas=_ROUND_GAS_LIMIT,
            resume=certificate.to_dict(),
            already_done=already_anchored,
        )
        events = self.contract.events.RoundAnchored().process_receipt(receipt)
        if not any(int(e["args"]["round"]) == approval.round for e in events):
            raise ChainRejectedError(
                f"anchorRound({approval.round}) succeeded without a RoundAnchored event",
                error_name=None,
                arguments={},
            )
        log(
            INFO,
            "Anchored round %d: model 0x%s, %d/%d approvals, %d gas",
            approval.round,
            approval.model_hash.hex()[:16],
            len(certificate.signers),
            len(certificate.committee),
            receipt["gasUsed"],
        )
        return AnchoredRound(
            approval,
            certificate.committee,
            certificate.signers,
            certificate.signatures,
            receipt["transactionHash"].to_0x_hex(),
            int(receipt["blockNumber"]),
            int(receipt["gasUsed"]),
        )

    def record_rollback(self, certificate: AnchorCertificate) -> RolledBackRound:
        """Record that a round rolled back to the last anchored model, with its certificate.

        ``certificate`` certifies a :class:`~bcsfl_flower.approvals.RoundRollback`
        (:meth:`prepare_rollback`): the round's miners', or the operator's alone. The
        reason it records is the one they signed.

        Raises
        ------
        ChainRejectedError
            If the round does not follow the last recorded one, or the contract refuses
            the certificate.
        ChainUnavailableError
            If the chain does not answer after :attr:`retry` attempts.
        """
        rollback = certificate.approval
        if not isinstance(rollback, RoundRollback):
            raise TypeError("record_rollback needs a RoundRollback's certificate")
        round_number, reason = rollback.round, rollback.reason

        def already_recorded() -> TxReceipt | None:
            if self._recorded_round() < round_number:
                return None
            events = self.contract.events.RoundRolledBack.get_logs(
                from_block=self.deploy_block, argument_filters={"round": round_number}
            )
            if not events:
                return None
            return self.connection.web3.eth.get_transaction_receipt(events[0]["transactionHash"])

        receipt = self._transact(
            f"recordRollback({round_number})",
            lambda: self.contract.functions.recordRollback(
                rollback.as_contract_tuple(),
                list(certificate.committee),
                certificate.packed_signatures,
                reason,
            ),
            gas=_ROUND_GAS_LIMIT,
            resume=certificate.to_dict(),
            already_done=already_recorded,
        )
        log(INFO, "Recorded rollback of round %d: %s", round_number, reason)
        return RolledBackRound(
            rollback,
            certificate.committee,
            certificate.signers,
            certificate.signatures,
            receipt["transactionHash"].to_0x_hex(),
            int(receipt["blockNumber"]),
        )

    # -- reading the trail -----------------------------------------------------------------

    def anchored_rounds(self) -> list[AnchoredRound]:
        """Read every anchored round back, with its certificate from the transaction input.

        The ``RoundAnchored`` events give the rounds; each event's transaction input is
        decoded to recover the committee and the signatures the contract checked.
        """
        rounds = []
        for event in self.contract.events.RoundAnchored.get_logs(from_block=self.deploy_block):
            params = self._call_input(event, "anchorRound")
            raw = params["approval"]
            approval = RoundApproval(
                round=int(raw["round"]),
                model_hash=bytes(raw["modelHash"]),
                previous_hash=bytes(raw["previousHash"]),
                accepted_root=bytes(raw["acceptedRoot"]),
                committee_root=bytes(raw["committeeRoot"]),
                state_root=bytes(raw["stateRoot"]),
                timestamp=int(raw["timestamp"]),
            )
            committee, signers, signatures = self._certificate_of(params, approval)
            receipt = self.connection.web3.eth.get_transaction_receipt(event["transactionHash"])
            rounds.append(
                AnchoredRound(
                    approval,
                    committee,
                    signers,
                    signatures,
                    event["transactionHash"].to_0x_hex(),
                    int(event["blockNumber"]),
                    int(receipt["gasUsed"]),
                )
            )
        return sorted(rounds, key=lambda anchored: anchored.round)

    def rollbacks(self) -> list[RolledBackRound]:
        """Read every recorded rollback back, with its certificate from the transaction input."""
        rounds = []
        for event in self.contract.events.RoundRolledBack.get_logs(from_block=self.deploy_block):
            params = self._call_input(event, "recordRollback")
            raw = params["rollback"]
            rollback = RoundRollback(
                round=int(raw["round"]),
                kept_model_hash=bytes(raw["keptModelHash"]),
                committee_root=bytes(raw["committeeRoot"]),
                state_root=bytes(raw["stateRoot"]),
                reason=str(params["reason"])[:ROLLBACK_REASON_LIMIT],
            )
            committee, signers, signatures = self._certificate_of(params, rollback)
            rounds.append(
                RolledBackRound(
                    rollback,
                    committee,
                    signers,
                    signatures,
                    event["transactionHash"].to_0x_hex(),
                    int(event["blockNumber"]),
                )
            )
        return sorted(rounds, key=lambda rolled: rolled.round)

    def _call_input(self, event: Any, function_name: str) -> dict[str, Any]:
        """Return the decoded arguments of the direct call that emitted ``event``."""
        tx = self.connection.web3.eth.get_transaction(event["transactionHash"])
        function, params = self.contract.decode_function_input(tx["input"])
        if function.fn_name != function_name:
            raise ValueError(
                f"{event['event']} in tx {event['transactionHash'].to_0x_hex()} was not "
                f"emitted by a direct {function_name} call"
            )
        return dict(params)

    def _certificate_of(
        self, params: Mapping[str, Any], signed: RoundApproval | RoundRollback
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[bytes, ...]]:
        """Return the committee, the signers and the signatures of a decoded call."""
        packed = bytes(params["signatures"])
        signatures = tuple(
            packed[i : i + SIGNATURE_BYTES] for i in range(0, len(packed), SIGNATURE_BYTES)
        )
        signers = tuple(signed.recover(signature, self.domain) for signature in signatures)
        return tuple(to_checksum_address(m) for m in params["miners"]), signers, signatures

    # -- manifest --------------------------------------------------------------------------

    def write_manifest(
        self, path: str | os.PathLike[str], models_dir: str | os.PathLike[str]
    ) -> Path:
        """Write ``chain.json``: how the ``bcsfl audit`` CLI reaches this trail after the run.

        Paths inside it are stored relative to the manifest's directory when they lie
        below it, so an output directory can be moved as a whole. The manifest also
        records the trail's head when written; call this after every round so that a
        reader notices a trail that ends earlier than the run did (for instance a
        truncated embedded journal). See :class:`ChainManifest` for the fields.

        Returns
        -------
        Path
            The manifest path.
        """
        manifest_path = Path(path)
        base = manifest_path.parent.resolve()
        description = self.connection.describe()
        for key in ("journal", "anvil_state"):
            if key in description:
                description[key] = _relative(Path(description[key]), base)
        genesis = self.genesis_hash()
        head_round, head_hash = self.head()
        record = {
            "format": MANIFEST_FORMAT,
            **description,
            "contract": self.address,
            "deploy_block": self.deploy_block,
            "genesis_hash": to_hex(genesis),
            "run": to_hex(self.domain.run),
            "operator": self.connection.operator.address,
            "models": _relative(Path(models_dir), base),
            "latest_round": self.latest_round(),
            "head": {"round": head_round, "model_hash": to_hex(head_hash)},
        }
        _write_json(manifest_path, record)
        return manifest_path

    # -- internals -------------------------------------------------------------------------

    def _read(self, action: str, call: Callable[[], Any]) -> Any:
        """Call a view function, retrying a chain that does not answer like a transaction.

        Raises
        ------
        ChainUnavailableError
            If the chain still does not answer after :attr:`retry` attempts.
        """
        return retry_transient(action, lambda _: call(), self.retry, self._sleep, resume={})

    def _recorded_round(self) -> int:
        """Return the last recorded round, read once (the caller's retry loop handles failures)."""
        return int(self.contract.functions.latestRound().call())

    def _transact(
        self,
        action: str,
        build: Callable[[], Any],
        *,
        gas: int,
        resume: Mapping[str, Any],
        already_done: Callable[[], TxReceipt | None] | None = None,
    ) -> TxReceipt:
        """Send ``build()`` from the operator, with retries.

        A preflight ``eth_call`` surfaces a revert (with its custom error) before anything
        is sent; the transaction then carries a fixed, generous gas limit instead of an
        ``eth_estimateGas``, which py-evm answers by a slow binary search. Only the gas
        used is paid.
        """
        operator = self.connection.operator.address

        def attempt() -> TxReceipt:
            function = build()
            function.call({"from": operator})
            return self.connection.send(function.build_transaction({"from": operator, "gas": gas}))

        return send_with_retries(
            action,
            attempt,
            self.retry,
            self._sleep,
            resume=resume,
            abi=self.abi,
            already_done=already_done,
        )


@dataclass(frozen=True)
class ChainManifest:
    """The contents of ``chain.json``, written by :meth:`AuditTrail.write_manifest`.

    ``chain.json`` is a JSON object with these keys:

    - ``format``: ``"bcsfl-chain/1"``.
    - ``backend``: ``"embedded"``, ``"anvil"`` or ``"http"``.
    - ``chain_id``: the chain id signatures are bound to.
    - ``contract``: the ``BCSFLAudit`` address; ``deploy_block``: where its events start.
    - ``genesis_hash``: hex hash of the initial model (round 0).
    - ``operator``: the owner address that sent every transaction.
    - ``journal`` (embedded): the transaction journal, replayed by readers.
    - ``anvil_state`` (anvil): the anvil state dump, loaded read-only by readers.
    - ``rpc_url`` (http): the node to query.
    - ``models``: the directory of the content-addressed model store.
    - ``latest_round`` and ``head`` (``round``, ``model_hash``): the last recorded round
      and the last anchored model when the manifest was written; the trail must reach
      at least that far.

    Relative paths are relative to the directory holding ``chain.json``.
    """

    path: Path
    backend: str
    chain_id: int
    contract: str
    deploy_block: int
    genesis_hash: bytes
    operator: str
    models_dir: Path
    journal: Path | None = None
    anvil_state: Path | None = None
    rpc_url: str | None = None
    latest_round: int = 0
    head_round: int = 0
    head_hash: bytes | None = None
    run: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ChainManifest:
        """Read and validate ``chain.json``.

        Raises
        ------
        FileNotFoundError
            If the file is missing.
        ValueError
            If it is not a bcsfl chain manifest or a field is missing, naming it.
        """
        manifest_path = Path(path)
        if manifest_path.is_symlink():  # a link to a pristine manifest elsewhere
            raise ValueError(
                f"{manifest_path} is a symbolic link (to {os.readlink(manifest_path)}): an "
                "audit reads only the run directory's own files"
            )
        if not manifest_path.is_file():
            raise FileNotFoundError(f"chain manifest {manifest_path} does not exist")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path} is not JSON: {err}") from err
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path}: format must be {MANIFEST_FORMAT!r}")
        try:
            backend = str(data["backend"])
            paths = {
                key: _inside(manifest_path, key, data[key]) if key in data else None
                for key in ("journal", "anvil_state")
            }
            return cls(
                path=manifest_path,
                backend=backend,
                chain_id=int(data["chain_id"]),
                contract=to_checksum_address(data["contract"]),
                deploy_block=int(data["deploy_block"]),
                genesis_hash=bytes.fromhex(str(data["genesis_hash"])[2:]),
                operator=to_checksum_address(data["operator"]),
                models_dir=_inside(manifest_path, "models", data["models"]),
                journal=paths["journal"],
                anvil_state=paths["anvil_state"],
                rpc_url=data.get("rpc_url"),
                latest_round=int(data.get("latest_round", 0)),
                run=str(data["run"]) if "run" in data else None,
                head_round=int(data.get("head", {}).get("round", 0)),
                head_hash=(
                    bytes.fromhex(data["head"]["model_hash"][2:]) if "head" in data else None
                ),
            )
        except KeyError as err:
            raise ValueError(f"{manifest_path} lacks the field {err.args[0]!r}") from err

    def claims(self) -> str:
        """Return what the manifest says about its chain, for an auditor to read, not trust."""
        where = f", rpc_url {self.rpc_url}" if self.rpc_url else ""
        return (
            f"{self.path} claims backend {self.backend!r}{where}, chain id {self.chain_id}, "
            f"contract {self.contract}, genesis 0x{self.genesis_hash.hex()}"
        )

    def open(self, chain: str | None = None) -> tuple[ChainConnection, AuditTrail]:
        """Reconnect read-only: replay the journal, load anvil's state, or dial the URL.

        Parameters
        ----------
        chain : str, optional
            The backend the caller chooses: ``"embedded"``, ``"anvil"`` or a JSON-RPC
            URL. An auditor of an untrusted run directory passes its own choice, so the
            directory cannot make it spawn a process or dial a node it did not pick; a
            manifest that claims another backend is refused. ``None`` trusts the
            manifest (the ServerApp reopening its own run).

        The caller must ``close()`` the connection (it may have spawned anvil).
        """
        from bcsfl_flower.chain.backends import (
            ANVIL_STATE_FILE,
            BACKEND_ANVIL,
            BACKEND_EMBEDDED,
            JOURNAL_FILE,
            connect,
        )

        if chain is not None and chain not in (BACKEND_EMBEDDED, BACKEND_ANVIL):
            return self._attached(connect(chain, self.path.parent, read_only=True))
        if chain is not None and chain != self.backend:
            raise ValueError(f"{self.claims()}; the auditor chose {chain!r}")
        if self.backend == BACKEND_EMBEDDED:
            if self.journal is None or self.journal.name != JOURNAL_FILE:
                raise ValueError(f"{self.path}: embedded backend needs a '{JOURNAL_FILE}' journal")
            connection = connect(BACKEND_EMBEDDED, self.journal.parent, read_only=True)
        elif self.backend == BACKEND_ANVIL:
            if self.anvil_state is None or self.anvil_state.name != ANVIL_STATE_FILE:
                raise ValueError(f"{self.path}: anvil backend needs '{ANVIL_STATE_FILE}'")
            connection = connect(BACKEND_ANVIL, self.anvil_state.parent, read_only=True)
        elif self.rpc_url:
            connection = connect(self.rpc_url, self.path.parent, read_only=True)
        else:
            raise ValueError(f"{self.path}: unknown backend {self.backend!r} without rpc_url")
        return self._attached(connection)

    def _attached(self, connection: ChainConnection) -> tuple[ChainConnection, AuditTrail]:
        """Attach to the manifest's contract on ``connection``; close it on failure."""
        try:
            if connection.chain_id != self.chain_id:
                raise ValueError(
                    f"{self.path} names chain {self.chain_id}, "
                    f"the chain answers {connection.chain_id}"
                )
            trail = AuditTrail.attach(connection, self.contract, deploy_block=self.deploy_block)
        except BaseException:
            connection.close()
            raise
        return connection, trail


def _inside(manifest_path: Path, key: str, value: object) -> Path:
    """Return ``value`` below the manifest's directory, refusing one that resolves outside it.

    An audited run directory is untrusted input: an absolute path, ``..`` or a symbolic
    link in ``chain.json`` would point ``verify`` at files elsewhere, such as a pristine
    copy of a tampered model.
    """
    path = manifest_path.parent / str(value)
    root = manifest_path.parent.resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(
            f"{manifest_path}: {key!r} is {value!r}, which resolves outside the run "
            f"directory {root}"
        )
    return path


def _relative(path: Path, base: Path) -> str:
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(base))
    except ValueError:
        return str(resolved)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
