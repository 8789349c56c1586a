"""Mining and anchoring of a round: the strategy's side of the audit trail.

The strategy decides a round; the notary makes that decision verifiable afterwards:

* it verifies the signed packet a client running the bcsfl mod attaches to its train
  reply (a client without the mod stays unsigned, and is accepted as such);
* for a committed round it sends the candidate package to the round's miners as a
  ``query.bcsfl_mine`` message, collects their EIP-712 approvals, and needs
  ``ceil(2N/3)`` of them for a quorum certificate. When no miner can sign (no client
  runs the mod) the operator's key signs instead, and the record says so;
* it stores the committed model under its hash, anchors the round on chain with the
  certificate (retried with backoff; never skipped), or records a rollback;
* it rewrites ``chain.json`` after every round so ``bcsfl audit`` can verify the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import ChainConnection, connect
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.chain.retry import RetryPolicy
from bcsfl_flower.packets import (
    PacketRejectedError,
    PacketVerifier,
    SignedModelPacket,
    accepted_root,
    model_hash,
)
from bcsfl_flower.protocol import (
    MINE_MESSAGE_TYPE,
    ConfigValue,
    mine_request,
    packet_record,
    read_verdict,
    signing_config,
)
from bcsfl_flower.round.checks import PacketCheck
from bcsfl_flower.round.state import Certification

MANIFEST_FILE = "chain.json"
MODELS_DIR = "models"
CHAIN_STATE_DIR = "chain"
REGISTRATION_STAKE = 1
"""Stake each client is registered with on chain. The live stake ledger is kept off
chain (it changes every round and writing it would make gas grow with the clients);
the results file records it per round."""


class RoundNotary:
    """Verify packets, gather the miners' quorum certificate, store and anchor rounds.

    Parameters
    ----------
    connection : ChainConnection
        An open chain connection (see :func:`bcsfl_flower.chain.backends.connect`).
    trail : AuditTrail
        The contract binding, opened on ``connection``.
    store : ModelStore
        Where committed models are saved under their hash.
    output_dir : Path
        The run's output directory; ``chain.json`` is written there.
    packet_window_s : float
        Maximum age of a client's packet.
    require_signed : bool
        Admit only signed replies: an unsigned reply is rejected like a forged one.
        Without it, a client that does not run the bcsfl mod takes part unsigned (and
        so anonymously: any node could join the vote without a registered key).
    mining_timeout : float
        Seconds to wait for the miners' approvals.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        connection: ChainConnection,
        trail: AuditTrail,
        store: ModelStore,
        output_dir: Path,
        *,
        registered: Iterable[str] = (),
        packet_window_s: float = 300.0,
        mining_timeout: float = 120.0,
        require_signed: bool = False,
    ) -> None:
        self.connection = connection
        self.trail = trail
        self.store = store
        self.output_dir = Path(output_dir)
        self.mining_timeout = mining_timeout
        self.verifier = PacketVerifier(trail.domain, registered, window_s=packet_window_s)
        self.require_signed = require_signed
        self.addresses: dict[str, str] = {}
        """Node id -> address, learned from verified packets."""

    @classmethod
    def open(
        cls,
        spec: str,
        output_dir: Path,
        initial_arrays: ArrayRecord,
        *,
        operator: LocalAccount | None = None,
        num_simulated_clients: int = 0,
        registered: Sequence[str] = (),
        retry: RetryPolicy | None = None,
        packet_window_s: float = 300.0,
        mining_timeout: float = 120.0,
        require_signed: bool = False,
    ) -> RoundNotary:
        """Connect to the chain, store the initial model and deploy (or attach to) the contract.

        Parameters
        ----------
        spec : str
            ``"embedded"``, ``"anvil"`` or an ``http(s)://`` JSON-RPC URL.
        operator : LocalAccount, optional
            The contract owner that sends every transaction; by default the PUBLIC
            development account 0, which the embedded chain and anvil fund.
        num_simulated_clients : int
            Register the development accounts of partitions ``0 .. n-1`` (the keys the
            bcsfl mod uses in simulation; public, so simulation only).
        registered : Sequence[str]
            Further client addresses to register (a deployment's registry).
        """
        output_dir = Path(output_dir)
        connection = connect(spec, output_dir / CHAIN_STATE_DIR, operator=operator)
        try:
            store = ModelStore(output_dir / MODELS_DIR)
            genesis = store.save(initial_arrays)
            trail = AuditTrail.open(connection, genesis, retry=retry)
            addresses = [client_dev_account(p).address for p in range(num_simulated_clients)]
            addresses += list(registered)
            trail.register_clients({address: REGISTRATION_STAKE for address in addresses})
            notary = cls(
                connection,
                trail,
                store,
                output_dir,
                registered=addresses,
                packet_window_s=packet_window_s,
                mining_timeout=mining_timeout,
                require_signed=require_signed,
            )
            notary.write_manifest()
        except BaseException:
            connection.close()
            raise
        return notary

    def signing_config(self) -> dict[str, ConfigValue]:
        """Train-config entries that make clients running the bcsfl mod sign their replies."""
        return signing_config(self.trail.domain)

    def check_packet(self, node_id: int, content: RecordDict, server_round: int) -> PacketCheck:
        """Verify a train reply's packet; an unsigned reply passes unless signing is required."""
        record = packet_record(content)
        if record is None:
            if self.require_signed:
                return PacketCheck(
                    rejection="unsigned reply: this federation admits only replies signed "
                    "by a registered client (require-signed)"
                )
            return PacketCheck()
        arrays = next(iter(content.array_records.values()))
        try:
            packet = self.verifier.verify(record, arrays, server_round)
        except PacketRejectedError as err:
            return PacketCheck(rejection=f"packet rejected: {err}")
        known = self.addresses.setdefault(str(node_id), packet.packet.client)
        if known != packet.packet.client:
            return PacketCheck(
                rejection=f"packet signed by {packet.packet.client}, but node {node_id} "
                f"signed as {known} before"
            )
        return PacketCheck(packet=packet)

    def certify(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        packets: Sequence[SignedModelPacket],
        miners: Sequence[str],
    ) -> Certification:
        """Ask the miners to approve the candidate and build the quorum certificate.

        Miners are the committee's node ids; only those whose address is known from a
        verified packet can sign. If none can, the operator signs alone. An address
        known from several node ids (a restarted node with the same key) is asked once,
        through the first of them in draw order: the committee may not list it twice.
        """
        digest = model_hash(arrays)
        root = accepted_root(packets, self.trail.domain)
        signing: dict[str, str] = {}
        for miner in miners:
            address = self.addresses.get(miner)
            if address is not None and address not in signing.values():
                signing[miner] = address
        if not signing:
            approval = self.trail.prepare_approval(
                server_round, digest, root, [self.connection.operator.address]
            )
            log(
                WARNING,
                "mining: no miner runs the bcsfl mod; the operator signs round %d",
                server_round,
            )
            certificate = AnchorCertificate.operator_signed(
                approval, self.connection.operator, self.trail.domain
            )
            return Certification(True, "operator", certificate=certificate)
        committee = list(signing.values())
        approval = self.trail.prepare_approval(server_round, digest, root, committee)
        content = mine_request(approval, self.trail.domain, committee, arrays, packets)
        messages = [
            Message(content=content, dst_node_id=int(node), message_type=MINE_MESSAGE_TYPE)
            for node in signing
        ]
        replies = grid.send_and_receive(messages, timeout=self.mining_timeout)
        signatures: dict[str, bytes] = {}
        refusals: dict[str, str] = {}
        for reply in replies:
            verdict = read_verdict(reply)
            node = str(reply.metadata.src_node_id)
            if verdict.approved and verdict.signer is not None and verdict.signature:
                signatures[verdict.signer] = verdict.signature
            else:
                refusals[node] = verdict.reason or "no verdict"
        for node in signing:
            if node not in refusals and signing[node] not in signatures:
                refusals.setdefault(node, "no reply")
        try:
            certificate = AnchorCertificate.build(
                approval, committee, signatures, self.trail.domain
            )
        except ValueError as err:
            log(WARNING, "mining: round %d has no quorum certificate: %s", server_round, err)
            return Certification(False, "none", refusals)
        log(
            INFO,
            "mining: %d/%d miners approved round %d",
            len(certificate.signers),
            len(committee),
            server_round,
        )
        return Certification(True, "miners", refusals, certificate)

    def anchor(self, arrays: ArrayRecord, certification: Certification) -> dict[str, Any]:
        """Store the committed model and anchor its round; return the record to keep."""
        if not certification.certified:
            raise ValueError("cannot anchor a round without a certificate")
        self.store.save(arrays)
        anchored = self.trail.anchor_round(certification.certificate)
        self.write_manifest()
        return {
            "anchored": True,
            "certified_by": certification.certified_by,
            "signers": list(certification.certificate.signers),
            "miner_refusals": certification.refusals,
            "tx": anchored.tx_hash,
            "gas_used": anchored.gas_used,
        }

    def rollback(self, server_round: int, reason: str) -> dict[str, Any]:
        """Record a rolled-back round on chain."""
        rolled = self.trail.record_rollback(server_round, reason[:200])
        self.write_manifest()
        return {"anchored": False, "rollback_tx": rolled.tx_hash}

    def write_manifest(self) -> None:
        """Rewrite ``chain.json`` with the trail's current head."""
        self.trail.write_manifest(self.output_dir / MANIFEST_FILE, self.store.root)

    def close(self) -> None:
        """Close the chain connection (stops a spawned anvil by pid)."""
        self.connection.close()
