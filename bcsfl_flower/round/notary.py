"""Mining and anchoring of a round: the strategy's side of the audit trail.

The strategy decides a round; the notary makes that decision verifiable afterwards:

* it verifies the signed packet a client running the bcsfl mod attaches to its train
  reply (a client without the mod stays unsigned, and is accepted as such);
* once the validators' signed ballots have decided the round, it prepares what the
  miners sign, the committed candidate's approval or the round's rollback
  (:meth:`RoundNotary.mining_plan`), with the statement that holds the ballots, so each
  miner recomputes the decision first; it checks their EIP-712 signatures and needs
  ``ceil(2N/3)`` of them for a quorum certificate (:meth:`RoundNotary.certify`). When
  no miner can sign, the operator's key certifies a rollback, and a commit only in a
  federation that admits unsigned clients (the contract's ``operatorCertifies``, fixed
  at deployment); the record says so;
* it stores the committed model under its hash, anchors the round on chain with the
  certificate (retried with backoff; never skipped), or records a rollback;
* it rewrites ``chain.json`` after every round so ``bcsfl audit`` can verify the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.logger import log

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
    committee_root,
)
from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.backends import ChainConnection, connect
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.keys import client_dev_account, development_addresses
from bcsfl_flower.chain.model_store import ModelStore
from bcsfl_flower.chain.retry import RetryPolicy
from bcsfl_flower.packets import (
    PacketRejectedError,
    PacketVerifier,
    SignedModelPacket,
    accepted_root,
    from_hex,
    to_hex,
)
from bcsfl_flower.protocol import (
    ROLLBACK_CANDIDATE,
    ConfigValue,
    MinerVerdict,
    mine_request,
    packet_record,
    rollback_request,
    signing_config,
)
from bcsfl_flower.round.checks import PacketCheck
from bcsfl_flower.round.conclusion import stated_rollback_reason
from bcsfl_flower.round.state import Certification
from bcsfl_flower.round.statement import RoundStatement

MANIFEST_FILE = "chain.json"
MODELS_DIR = "models"
CHAIN_STATE_DIR = "chain"
REGISTRATION_STAKE = 1
"""Stake each client is registered with on chain. The live stake ledger is kept off
chain (it changes every round and writing it would make gas grow with the clients);
the results file records it per round."""


@dataclass(frozen=True)
class MiningPlan:
    """The round's mining duty: who signs, and what each candidate's approval says.

    Attributes
    ----------
    server_round : int
        The round.
    signing : Mapping[str, str]
        Miner node id -> address, for the miners that can sign (in draw order).
    approvals : Mapping[str, RoundApproval | RoundRollback]
        Candidate name -> the statement its miners sign, and under
        :data:`~bcsfl_flower.protocol.ROLLBACK_CANDIDATE` the round's rollback.
    requests : Mapping[str, RecordDict]
        The same names -> the :func:`~bcsfl_flower.protocol.mine_request` (or
        :func:`~bcsfl_flower.protocol.rollback_request`) content.
    """

    server_round: int
    signing: Mapping[str, str]
    approvals: Mapping[str, RoundApproval | RoundRollback]
    requests: Mapping[str, RecordDict]


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
        Admit only signed replies (the default): an unsigned reply is rejected like a
        forged one. ``False`` lets a client that does not run the bcsfl mod take part
        unsigned, and so anonymously: any node could join the vote without a registered
        key, and the operator certifies the rounds alone.
    keep_updates : bool
        Keep every round's accepted updates in the store (the ballots are in every
        round's statement), so that
        ``bcsfl audit replay`` can recompute the round (run config
        ``replayable-rounds``).
    node_bindings : Mapping[str, int]
        Client address -> the Flower node id it may sign from. With SuperNode
        authentication the SuperLink gives each registered node key one node id
        (``flwr supernode register`` prints it) and stamps it on that node's messages,
        so a packet signed with a bound address from any other node is rejected: a node
        can sign only as itself, even with another node's stolen Ethereum key.
    """

    def __init__(
        self,
        connection: ChainConnection,
        trail: AuditTrail,
        store: ModelStore,
        output_dir: Path,
        *,
        registered: Iterable[str] = (),
        packet_window_s: float = 300.0,
        require_signed: bool = True,
        keep_updates: bool = False,
        node_bindings: Mapping[str, int] | None = None,
    ) -> None:
        self.connection = connection
        self.keep_updates = keep_updates
        self.trail = trail
        self.store = store
        self.output_dir = Path(output_dir)
        registered = list(registered)
        self.verifier = PacketVerifier(trail.domain, registered, window_s=packet_window_s)
        self.development_keys = bool(development_addresses(registered))
        """Whether the registered clients include public development accounts."""
        self.require_signed = require_signed
        self.addresses: dict[str, str] = {}
        """Node id -> address, learned from verified packets."""
        self.node_bindings: dict[str, int] = {
            to_checksum_address(address): node for address, node in (node_bindings or {}).items()
        }

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
        require_signed: bool = True,
        keep_updates: bool = False,
        node_bindings: Mapping[str, int] | None = None,
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
        node_bindings : Mapping[str, int], optional
            Registered addresses bound to the node id each may sign from (see the
            class's parameters); they are registered too.
        """
        output_dir = Path(output_dir)
        connection = connect(spec, output_dir / CHAIN_STATE_DIR, operator=operator)
        try:
            store = ModelStore(output_dir / MODELS_DIR)
            genesis = store.save(initial_arrays)
            trail = AuditTrail.open(
                connection, genesis, operator_certifies=not require_signed, retry=retry
            )
            addresses: list[str] = [
                client_dev_account(p).address for p in range(num_simulated_clients)
            ]
            bindings: dict[str, int] = {
                to_checksum_address(a): n for a, n in (node_bindings or {}).items()
            }
            addresses += [a for a in [*registered, *bindings] if a not in addresses]
            trail.register_clients({address: REGISTRATION_STAKE for address in addresses})
            notary = cls(
                connection,
                trail,
                store,
                output_dir,
                registered=addresses,
                packet_window_s=packet_window_s,
                require_signed=require_signed,
                keep_updates=keep_updates,
                node_bindings=bindings,
            )
            notary.write_manifest()
        except BaseException:
            connection.close()
            raise
        return notary

    def signing_config(self) -> dict[str, ConfigValue]:
        """Config entries that make clients running the bcsfl mod sign their replies.

        They admit the public development keys only when this trail registered them
        (simulation); a deployment's nodes must sign with their own keystores.
        """
        return signing_config(self.trail.domain, development_keys=self.development_keys)

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
        signed = self._parsed_if_bound(record)
        if (rejection := self._bound_elsewhere(node_id, signed)) is not None:
            return PacketCheck(rejection=rejection)
        arrays = next(iter(content.array_records.values()))
        try:
            packet = self.verifier.verify(signed, arrays, server_round)
        except PacketRejectedError as err:
            return PacketCheck(rejection=f"packet rejected: {err}")
        known = self.addresses.setdefault(str(node_id), packet.packet.client)
        if known != packet.packet.client:
            return PacketCheck(
                rejection=f"packet signed by {packet.packet.client}, but node {node_id} "
                f"signed as {known} before"
            )
        return PacketCheck(packet=packet)

    def _parsed_if_bound(self, record: ConfigRecord) -> SignedModelPacket | ConfigRecord:
        """Return the packet parsed once, when bindings need its claimed address.

        The binding is checked before the packet is verified: verification admits one
        packet per address and round, so a node holding a stolen key must not use up
        its owner's. A record that does not parse is left to verification, which
        rejects it saying why.
        """
        if not self.node_bindings:
            return record
        try:
            return SignedModelPacket.from_config_record(record)
        except ValueError:
            return record

    def _bound_elsewhere(
        self, node_id: int, signed: SignedModelPacket | ConfigRecord
    ) -> str | None:
        """Return why node ``node_id`` may not send ``signed``: its address is bound elsewhere."""
        if not isinstance(signed, SignedModelPacket):
            return None
        claimed = signed.packet.client
        bound = self.node_bindings.get(claimed)
        if bound is None or bound == node_id:
            return None
        return (
            f"packet claims {claimed}, which the client registry binds to node {bound}: "
            f"node {node_id} cannot sign as it"
        )

    def mining_plan(
        self,
        statement: RoundStatement,
        outcome: str,
        arrays: ArrayRecord | None,
        supports: Sequence[SignedModelPacket],
        miners: Sequence[str],
        reachable: Collection[str] | None = None,
    ) -> MiningPlan:
        """Prepare what the miners sign: the committed candidate's approval, or the rollback.

        The miners sign once the validators have cast their ballots and the decision is
        taken: ``statement`` holds the ballots, and its hash is the ``stateRoot`` they
        sign, so each miner can recompute the decision before it signs. ``outcome`` is
        the committed candidate's name with its model ``arrays`` and its supporters'
        ``supports``, or :data:`~bcsfl_flower.protocol.ROLLBACK_CANDIDATE`.

        Miners are the committee's node ids; only those whose address is known from a
        verified packet can sign, and of those only the ``reachable`` ones (that serve
        committee duties this round; all by default). An address known from several
        node ids (a restarted node with the same key) is asked once, through the first
        of them in draw order: the committee may not list it twice.
        """
        signing: dict[str, str] = {}
        for miner in miners:
            address = self.addresses.get(miner)
            if reachable is not None and miner not in reachable:
                continue
            if address is not None and address not in signing.values():
                signing[miner] = address
        committee = list(signing.values()) or [self.connection.operator.address]
        document, root, domain = statement.to_bytes(), statement.digest(), self.trail.domain
        approval: RoundApproval | RoundRollback
        if outcome == ROLLBACK_CANDIDATE:
            reason = stated_rollback_reason(statement, domain)
            approval = self.trail.prepare_rollback(statement.round, committee, root, reason)
            request = rollback_request(approval, domain, committee, document)
        else:
            assert arrays is not None and statement.plan is not None
            # the statement holds every candidate's hash already: no model is hashed twice
            committed = from_hex(statement.plan.scored[outcome])
            supported = accepted_root(supports, domain)
            approval = self.trail.prepare_approval(
                statement.round, committed, supported, committee, root
            )
            request = mine_request(approval, domain, committee, arrays, supports, document)
        return MiningPlan(statement.round, signing, {outcome: approval}, {outcome: request})

    def certify(
        self, plan: MiningPlan, candidate: str, verdicts: Mapping[str, MinerVerdict]
    ) -> Certification:
        """Build the outcome's quorum certificate from its miners' verdicts.

        ``candidate`` is the committed candidate's name, or
        :data:`~bcsfl_flower.protocol.ROLLBACK_CANDIDATE`; ``verdicts`` maps miner node
        ids to their answer on it, and a miner with no answer counts as a refusal. If no
        miner could sign, the operator signs alone where the contract lets it (a
        rollback; a commit only with ``operatorCertifies``), and the record says so.
        """
        approval = plan.approvals[candidate]
        if not plan.signing:
            return self._operator_certification(approval)
        signatures: dict[str, bytes] = {}
        refused: dict[str, bytes] = {}
        refusals: dict[str, str] = {}
        for node, address in plan.signing.items():
            verdict = verdicts.get(node)
            if verdict is None:
                refusals[node] = "no reply"
            elif not verdict.approved or verdict.signature is None:
                refusals[node] = verdict.reason or "no verdict"
                if verdict.refusal is not None and verdict.signer == address:
                    refused[address] = verdict.refusal
            elif verdict.signer != address:  # one miner must not speak for another
                refusals[node] = f"answered as {verdict.signer}, but node {node} is {address}"
            else:
                signatures[address] = verdict.signature
        committee = list(plan.signing.values())
        try:
            certificate = AnchorCertificate.build(
                approval, committee, signatures, self.trail.domain
            )
        except ValueError as err:
            log(WARNING, "mining: round %d has no quorum certificate: %s", plan.server_round, err)
            return Certification(
                False, "none", refusals, refusal=self._refusal(approval, committee, refused)
            )
        log(
            INFO,
            "mining: %d/%d miners approved round %d",
            len(certificate.signers),
            len(committee),
            plan.server_round,
        )
        return Certification(True, "miners", refusals, certificate)

    def _refusal(
        self,
        approval: RoundApproval | RoundRollback,
        committee: list[str],
        refused: Mapping[str, bytes],
    ) -> AnchorCertificate | None:
        """Return the certificate of a quorum of signed refusals of a commit, if there is one.

        It certifies the round's rollback as the miners' word: without it, the rollback of
        a round whose ballots commit is the operator's alone, which ``bcsfl audit verify``
        reports as withheld.
        """
        if not isinstance(approval, RoundApproval) or not refused:
            return None
        try:
            return AnchorCertificate.build(
                approval.refusal(), committee, dict(refused), self.trail.domain
            )
        except ValueError as err:
            log(WARNING, "mining: round %d's refusals certify no rollback: %s", approval.round, err)
            return None

    def _operator_certification(self, approval: RoundApproval | RoundRollback) -> Certification:
        """Certify ``approval`` with the operator's key alone, where the contract allows it."""
        if isinstance(approval, RoundApproval) and not self.trail.operator_certifies():
            log(WARNING, "mining: no miner can sign round %d's commit", approval.round)
            return Certification(False, "none", {"operator": "the operator cannot certify"})
        log(WARNING, "mining: no miner can sign; the operator certifies round %d", approval.round)
        operator = self.connection.operator
        alone = dataclasses.replace(approval, committee_root=committee_root([operator.address]))
        certificate = AnchorCertificate.operator_signed(alone, operator, self.trail.domain)
        return Certification(True, "operator", certificate=certificate)

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
            "state_root": to_hex(anchored.approval.state_root),
        }

    def rollback(
        self, statement: RoundStatement, certification: Certification | None = None
    ) -> dict[str, Any]:
        """Record a rolled-back round on chain, with the hash of its state statement.

        ``certification`` is the miners' certificate of the rollback; without one (the
        round drew no committee, or too few miners signed) the operator certifies it. The
        reason recorded is the one recomputed from the statement
        (:func:`~bcsfl_flower.round.conclusion.stated_rollback_reason`), which the miners
        sign too.
        """
        if certification is None or not certification.certified:
            reason = stated_rollback_reason(statement, self.trail.domain)
            rollback = self.trail.prepare_rollback(
                statement.round, [self.connection.operator.address], statement.digest(), reason
            )
            certification = self._operator_certification(rollback)
        rolled = self.trail.record_rollback(certification.certificate)
        self.write_manifest()
        return {
            "anchored": False,
            "certified_by": certification.certified_by,
            "signers": list(rolled.signers),
            "rollback_tx": rolled.tx_hash,
            "state_root": to_hex(statement.digest()),
        }

    def keep_round(self, statement: RoundStatement, updates: Sequence[ArrayRecord]) -> None:
        """Store the round's state statement, and its updates if replayable.

        The statement (a few kB, the ballots included) is always kept: ``bcsfl audit
        verify`` re-derives the committee and the decision from it. The accepted updates
        (one model each) are kept only with ``keep_updates``, for ``bcsfl audit replay``.
        """
        self.store.save_document(statement.to_bytes())
        if not self.keep_updates:
            return
        for arrays in updates:
            self.store.save(arrays)

    def write_manifest(self) -> None:
        """Rewrite ``chain.json`` with the trail's current head."""
        self.trail.write_manifest(self.output_dir / MANIFEST_FILE, self.store.root)

    def close(self) -> None:
        """Close the chain connection (stops a spawned anvil by pid)."""
        self.connection.close()
