"""BCSFLAudit against a real anvil (started by the fixture), plus the embedded backend.

Every custom error of the contract is triggered below and asserted by name, as the
Python binding decodes it (``ChainRejectedError.error_name``); every owner-only function
is called by an outsider and must revert with ``NotOwner``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from chain_fixtures import (
    GENESIS,
    approval_for,
    certificate,
    clients,
    committee_of,
    deploy,
    http_connection,
    rollback_certificate,
    running_anvil,
    toy_model,
)
from eth_keys.backends.native import ecdsa
from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractLogicError

from bcsfl_flower.approvals import (
    committee_root,
)
from bcsfl_flower.chain.audit import DEPLOYMENT_FILE, AuditTrail
from bcsfl_flower.chain.backends import connect, spawn_anvil, stop_anvil
from bcsfl_flower.chain.certificates import AnchorCertificate, quorum
from bcsfl_flower.chain.compiler import ARTIFACT_PATH, compile_contract, load_artifact
from bcsfl_flower.chain.errors import ChainRejectedError, RoundNotAnchoredError, rejected_error
from bcsfl_flower.chain.keys import dev_account
from bcsfl_flower.packets import (
    Eip712Domain,
    model_hash,
)

CURVE_ORDER = ecdsa.N
ECRECOVER = "0x0000000000000000000000000000000000000001"
ZERO_ADDRESS = "0x" + "00" * 20


@pytest.fixture(scope="module")
def anvil_url():
    with running_anvil() as url:
        yield url


@pytest.fixture()
def anvil_connection(anvil_url, tmp_path):
    return http_connection(anvil_url, tmp_path)


@contextmanager
def anvil_with_chain_id(chain_id: int) -> Iterator[str]:
    """A fresh anvil answering ``chain_id``; stopped by pid on exit."""
    process, url = spawn_anvil(extra_args=("--chain-id", str(chain_id)))
    try:
        yield url
    finally:
        stop_anvil(process)
        assert process.poll() is not None, f"anvil (pid {process.pid}) is still running"


def owner_sends(trail: AuditTrail, function) -> ChainRejectedError:
    """Send ``function`` from the owner through the binding; return the decoded rejection."""
    with pytest.raises(ChainRejectedError) as raised:
        trail._transact("test", lambda: function, gas=1_000_000, resume={})
    return raised.value


def rejection_for(trail: AuditTrail, function, sender: str) -> ChainRejectedError:
    """Call ``function`` from ``sender``; return the revert decoded as the binding does."""
    with pytest.raises(ContractLogicError) as raised:
        function.call({"from": sender})
    return rejected_error(trail.abi, "test", raised.value)


def anchor_rejection(trail: AuditTrail, cert: AnchorCertificate) -> ChainRejectedError:
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(cert)
    return raised.value


def rollback_rejection(
    trail: AuditTrail, cert: AnchorCertificate, *, kept: bytes | None = None
) -> ChainRejectedError:
    """The revert of ``recordRollback`` with ``cert``, its signed kept hash replaced by ``kept``."""
    rollback = cert.approval
    if kept is not None:
        rollback = dataclasses.replace(rollback, kept_model_hash=kept)
    function = trail.contract.functions.recordRollback(
        rollback.as_contract_tuple(), list(cert.committee), cert.packed_signatures, rollback.reason
    )
    return owner_sends(trail, function)


def with_signatures(cert: AnchorCertificate, *signatures: bytes) -> AnchorCertificate:
    """``cert`` carrying exactly ``signatures`` (``signers`` is informational only)."""
    return dataclasses.replace(cert, signers=(), signatures=tuple(signatures))


def ecrecover_precompile(web3, digest: bytes, signature: bytes) -> str | None:
    """What the EVM's ecrecover returns for ``signature``, with no low-s rule applied."""
    r, s, v = signature[:32], signature[32:64], signature[64]
    data = "0x" + (digest + v.to_bytes(32, "big") + r + s).hex()
    out = bytes(web3.eth.call({"to": ECRECOVER, "data": data}))
    return to_checksum_address(out[12:]) if out else None


def sign_with_nonce(account, digest: bytes, nonce: int) -> bytes:
    """A canonical (low-s) signature of ``digest`` by ``account`` with ECDSA nonce ``nonce``.

    eth-account derives the nonce from the key and digest (RFC 6979), so it yields one
    signature per key and statement; another nonce gives a second, equally valid one.
    """
    key = int.from_bytes(bytes(account.key), "big")
    x, y = ecdsa.fast_multiply(ecdsa.G, nonce)
    r = x % CURVE_ORDER
    s = ecdsa.inv(nonce, CURVE_ORDER) * (int.from_bytes(digest, "big") + r * key) % CURVE_ORDER
    parity = y & 1
    if s > CURVE_ORDER // 2:
        s, parity = CURVE_ORDER - s, parity ^ 1
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + parity])


def by_address(accounts):
    return sorted(accounts, key=lambda account: int(account.address, 16))


def head_digest(model: bytes) -> str:
    """The contract's head digest of ``model``: bytes24(keccak256(abi.encode(model)))."""
    return "0x" + keccak(model)[:24].hex()


def anchor_directly(trail: AuditTrail, approval, committee, signatures):
    """Send ``anchorRound`` built by hand (not through the binding); return the receipt."""
    function = trail.contract.functions.anchorRound(
        approval.as_contract_tuple(), list(committee), b"".join(signatures)
    )
    owner = trail.connection.operator.address
    function.call({"from": owner})
    return trail.connection.send(function.build_transaction({"from": owner, "gas": 1_000_000}))


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------


def test_committed_artifact_matches_a_fresh_compilation():
    fresh = compile_contract()
    committed = load_artifact(ARTIFACT_PATH)
    assert fresh["compiler"] == committed["compiler"]
    assert fresh["abi"] == committed["abi"]
    assert fresh["bytecode"] == committed["bytecode"], (
        "BCSFLAudit.json is stale: run `python -m bcsfl_flower.chain.compiler`"
    )
    assert fresh["deployedBytecode"] == committed["deployedBytecode"]


def test_the_contract_has_no_stake_updates_or_deregistration():
    names = {entry.get("name") for entry in load_artifact(ARTIFACT_PATH)["abi"]}
    removed = {
        "setStake",
        "deregisterClient",
        "stakeOf",
        "StakeUpdated",
        "ClientDeregistered",
        "NotRegistered",
    }
    assert not names & removed
    assert not hasattr(AuditTrail, "set_stake")
    assert not hasattr(AuditTrail, "stake_of")


def test_per_round_storage_views_are_gone_and_events_serve_history():
    abi = load_artifact(ARTIFACT_PATH)["abi"]
    names = {entry.get("name") for entry in abi}
    # the contract keeps one slot (its head): rounds are read back from events
    assert not names & {
        "getLatestModel",
        "getRound",
        "getBlockchain",
        "roundCount",
        "rollbackCount",
        "SignerNotEligible",
        "RoundNotAnchored",
    }
    assert {
        "isLatestModel",
        "latestRound",
        "genesisModelHash",
        "deploymentBlock",
        "owner",
        "clientCount",
        "isRegistered",
        "DOMAIN_SEPARATOR",
        "approvalDigest",
        "rollbackDigest",
        "runId",
        "operatorCertifies",
        "quorum",
        "eip712Domain",
    } <= names
    events = {entry["name"]: entry for entry in abi if entry["type"] == "event"}
    assert [(i["name"], i["type"], i["indexed"]) for i in events["RoundAnchored"]["inputs"]] == [
        ("round", "uint64", True),
        ("modelHash", "bytes32", True),
        ("previousHash", "bytes32", False),
        ("acceptedRoot", "bytes32", False),
        ("committeeRoot", "bytes32", False),
        ("stateRoot", "bytes32", False),
        ("timestamp", "uint64", False),
    ]
    assert [(i["name"], i["type"], i["indexed"]) for i in events["RoundRolledBack"]["inputs"]] == [
        ("round", "uint64", True),
        ("keptModelHash", "bytes32", True),
        ("committeeRoot", "bytes32", False),
        ("stateRoot", "bytes32", False),
        ("reason", "string", False),
    ]


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def test_owner_registers_clients_with_stakes(anvil_connection):
    accounts = clients(3)
    trail = deploy(anvil_connection, accounts[:2])
    assert trail.client_count() == 2
    assert trail.is_registered(accounts[0].address)
    assert not trail.is_registered(accounts[2].address)
    events = trail.contract.events.ClientRegistered.get_logs(from_block=trail.deploy_block)
    assert [(e["args"]["client"], e["args"]["stake"]) for e in events] == [
        (a.address, 100) for a in accounts[:2]
    ]
    # registering again is a no-op for the binding, a revert for the contract
    assert trail.register_clients({accounts[0].address: 1, accounts[2].address: 5}) == 1
    assert trail.client_count() == 3
    rejected = owner_sends(trail, trail.contract.functions.registerClient(accounts[0].address, 1))
    assert rejected.error_name == "AlreadyRegistered"
    assert rejected.arguments == {"client": accounts[0].address}
    assert trail.client_count() == 3


def test_registration_rejects_bad_input_atomically(anvil_connection):
    accounts = clients(3)
    trail = deploy(anvil_connection, [])
    functions = trail.contract.functions
    first, second = accounts[0].address, accounts[1].address

    rejected = owner_sends(trail, functions.registerClient(ZERO_ADDRESS, 1))
    assert rejected.error_name == "ZeroAddress"
    rejected = owner_sends(trail, functions.registerClients([first, ZERO_ADDRESS], [1, 1]))
    assert rejected.error_name == "ZeroAddress"
    rejected = owner_sends(trail, functions.registerClients([first, second], [1]))
    assert (rejected.error_name, rejected.arguments) == ("LengthMismatch", {"left": 2, "right": 1})
    rejected = owner_sends(trail, functions.registerClients([first, second, first], [1, 2, 3]))
    assert (rejected.error_name, rejected.arguments) == ("AlreadyRegistered", {"client": first})
    # a batch is all or nothing: no earlier entry of a rejected batch stays registered
    assert trail.client_count() == 0
    assert not trail.is_registered(first)
    assert not trail.is_registered(second)


# --------------------------------------------------------------------------------------
# Access control
# --------------------------------------------------------------------------------------


OWNER_ONLY = ("registerClient", "registerClients", "anchorRound", "recordRollback")


def test_every_state_changing_function_is_listed_as_owner_only():
    abi = load_artifact(ARTIFACT_PATH)["abi"]
    writers = {
        entry["name"]
        for entry in abi
        if entry["type"] == "function" and entry["stateMutability"] not in ("view", "pure")
    }
    assert writers == set(OWNER_ONLY)


@pytest.mark.parametrize("name", OWNER_ONLY)
def test_owner_only_functions_revert_for_anyone_else(anvil_connection, name):
    miners = clients(3)
    newcomer = clients(4)[3].address
    trail = deploy(anvil_connection, miners)
    cert = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
    rolled = rollback_certificate(trail, 1, miners)
    functions = trail.contract.functions
    function = {
        "registerClient": lambda: functions.registerClient(newcomer, 1),
        "registerClients": lambda: functions.registerClients([newcomer], [1]),
        "anchorRound": lambda: functions.anchorRound(
            cert.approval.as_contract_tuple(), list(cert.committee), cert.packed_signatures
        ),
        "recordRollback": lambda: functions.recordRollback(
            rolled.approval.as_contract_tuple(),
            list(rolled.committee),
            rolled.packed_signatures,
            "no quorum",
        ),
    }[name]()

    def state():
        return (
            trail.latest_round(),
            trail.head(),
            trail.round_count(),
            len(trail.rollbacks()),
            trail.client_count(),
            trail.is_registered(newcomer),
        )

    before = state()
    owner = anvil_connection.operator.address
    function.call({"from": owner})  # the very same call succeeds for the owner
    outsider = dev_account(9)
    assert outsider.address != owner
    rejected = rejection_for(trail, function, outsider.address)
    assert (rejected.error_name, rejected.arguments) == ("NotOwner", {"caller": outsider.address})
    # a mined transaction from the outsider fails too and changes nothing
    web3 = anvil_connection.web3
    tx = function.build_transaction(
        {
            "from": outsider.address,
            "gas": 1_000_000,
            "nonce": web3.eth.get_transaction_count(outsider.address),
        }
    )
    receipt = web3.eth.wait_for_transaction_receipt(
        web3.eth.send_raw_transaction(outsider.sign_transaction(tx).raw_transaction)
    )
    assert receipt["status"] == 0
    assert state() == before


# --------------------------------------------------------------------------------------
# Anchoring
# --------------------------------------------------------------------------------------


def test_anchoring_links_rounds_and_reads_them_back_from_events(anvil_connection):
    accounts = clients(6)
    miners = accounts[:5]
    trail = deploy(anvil_connection, accounts)
    functions = trail.contract.functions
    assert trail.head() == (0, GENESIS)
    assert trail.get_blockchain() == [(0, GENESIS)]
    assert trail.round_count() == 0

    first = approval_for(trail, 1, 1.0, miners, state_root=b"\x11" * 32)
    assert first.previous_hash == GENESIS
    assert functions.approvalDigest(first.as_contract_tuple()).call() == (
        first.digest(trail.domain)
    )
    anchored = trail.anchor_round(certificate(trail, first, miners, miners))
    assert anchored.round == 1
    assert anvil_connection.web3.eth.get_transaction_receipt(anchored.tx_hash)["status"] == 1

    second = approval_for(trail, 2, 2.0, miners, state_root=b"\x22" * 32)
    assert second.previous_hash == model_hash(toy_model(1.0))
    trail.anchor_round(certificate(trail, second, miners, miners[:4]))

    one, two = model_hash(toy_model(1.0)), model_hash(toy_model(2.0))
    assert trail.head() == (2, two)
    assert trail.latest_round() == 2
    # the head keeps a digest only: it confirms the last anchored hash and nothing else
    assert functions.isLatestModel(two).call()
    assert not functions.isLatestModel(one).call()
    assert not functions.isLatestModel(GENESIS).call()
    assert trail.get_round(0) == GENESIS
    assert trail.get_round(1) == one
    assert trail.get_round(2) == two
    assert trail.round_count() == 2
    assert trail.get_blockchain() == [(0, GENESIS), (1, one), (2, two)]
    assert trail.get_blockchain(0, 99) == [(0, GENESIS), (1, one), (2, two)]
    assert trail.get_blockchain(1) == [(1, one), (2, two)]
    assert trail.get_blockchain(2, 2) == [(2, two)]
    assert trail.get_blockchain(0, 0) == [(0, GENESIS)]
    assert trail.get_blockchain(2, 1) == []
    assert trail.get_blockchain(3) == []

    events = trail.contract.events.RoundAnchored.get_logs(from_block=trail.deploy_block)
    assert [dict(e["args"]) for e in events] == [
        {
            "round": a.round,
            "modelHash": a.model_hash,
            "previousHash": a.previous_hash,
            "acceptedRoot": a.accepted_root,
            "committeeRoot": a.committee_root,
            "stateRoot": a.state_root,
            "timestamp": a.timestamp,
        }
        for a in (first, second)
    ]
    read_back = trail.anchored_rounds()
    assert [r.round for r in read_back] == [1, 2]
    assert [len(r.signers) for r in read_back] == [5, 4]
    assert [r.approval for r in read_back] == [first, second]
    assert [r.approval.state_root for r in read_back] == [b"\x11" * 32, b"\x22" * 32]

    with pytest.raises(RoundNotAnchoredError, match="round 3 is not anchored"):
        trail.get_round(3)
    with pytest.raises(LookupError):
        trail.get_round(99)


def test_head_is_checked_against_the_contract(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    trail.anchor_round(certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners))
    assert trail.head() == (1, model_hash(toy_model(1.0)))
    # a node that serves no logs: the reader's "last event" (the genesis) is not the head
    real_get_logs = trail.contract.events.RoundAnchored.get_logs
    trail.contract.events.RoundAnchored.get_logs = lambda **_: []
    try:
        with pytest.raises(RuntimeError, match="partial logs"):
            trail.head()
    finally:
        trail.contract.events.RoundAnchored.get_logs = real_get_logs
    assert trail.head() == (1, model_hash(toy_model(1.0)))


def test_deployment_immutables(anvil_connection):
    trail = deploy(anvil_connection, [])
    functions = trail.contract.functions
    receipt = anvil_connection.web3.eth.get_transaction_receipt(
        trail.contract.events.GenesisAnchored.get_logs(from_block=trail.deploy_block)[0][
            "transactionHash"
        ]
    )
    assert receipt["contractAddress"] == trail.address
    assert functions.deploymentBlock().call() == trail.deploy_block == receipt["blockNumber"]
    assert functions.genesisModelHash().call() == GENESIS == trail.genesis_hash()
    assert functions.owner().call() == anvil_connection.operator.address
    assert functions.latestRound().call() == 0
    assert functions.isLatestModel(GENESIS).call()
    # a second trail on the same chain starts where it was deployed
    other = AuditTrail.deploy(anvil_connection, model_hash(toy_model(7.0)))
    assert other.contract.functions.deploymentBlock().call() == other.deploy_block
    assert other.deploy_block > trail.deploy_block
    assert other.genesis_hash() == model_hash(toy_model(7.0))
    assert other.head() == (0, model_hash(toy_model(7.0)))
    # the run's identity: announced at deployment, read into the signing domain, and
    # fresh for every deployment, even of the same genesis
    (genesis_event,) = trail.contract.events.GenesisAnchored.get_logs(from_block=trail.deploy_block)
    assert genesis_event["args"]["runId"] == functions.runId().call() == trail.domain.run
    assert genesis_event["args"]["operatorCertifies"] is False
    assert functions.operatorCertifies().call() is False
    twin = AuditTrail.deploy(anvil_connection, GENESIS)
    assert twin.domain.run not in (trail.domain.run, other.domain.run, bytes(32))


def test_zero_genesis_is_rejected_at_deployment(anvil_connection):
    artifact = load_artifact(ARTIFACT_PATH)
    web3 = anvil_connection.web3
    factory = web3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    owner = anvil_connection.operator.address
    salt = b"\x01" * 32
    creation = {
        "from": owner,
        "data": factory.constructor(bytes(32), salt, False).data_in_transaction,
    }
    with pytest.raises(ContractLogicError) as raised:
        web3.eth.call(creation)
    rejected = rejected_error(artifact["abi"], "deploy", raised.value)
    assert (rejected.error_name, rejected.arguments) == ("ZeroModelHash", {})
    # the binding refuses before sending anything, and records nothing to attach to
    nonce = web3.eth.get_transaction_count(owner)
    with pytest.raises(ValueError, match="genesis_hash is zero"):
        AuditTrail.deploy(anvil_connection, bytes(32))
    assert not (anvil_connection.state_dir / DEPLOYMENT_FILE).exists()
    assert web3.eth.get_transaction_count(owner) == nonce
    # any other hash deploys
    web3.eth.call(
        {**creation, "data": factory.constructor(GENESIS, salt, False).data_in_transaction}
    )


def test_domain_views_match_the_off_chain_signer(anvil_connection):
    miners = clients(1)
    trail = deploy(anvil_connection, miners)
    functions = trail.contract.functions
    approval = approval_for(trail, 1, 1.0, miners)
    # eth-account's EIP-712 header is the domain separator the miners sign under
    assert functions.DOMAIN_SEPARATOR().call() == approval.signable(trail.domain).header
    assert functions.eip712Domain().call() == [
        b"\x0f",
        "BCSFLAudit",
        "1",
        anvil_connection.chain_id,
        trail.address,
        bytes(32),
        [],
    ]
    assert functions.ROUND_APPROVAL_TYPEHASH().call() == keccak(
        text="RoundApproval(bytes32 run,uint64 round,bytes32 modelHash,bytes32 previousHash,"
        "bytes32 acceptedRoot,bytes32 committeeRoot,bytes32 stateRoot,uint64 timestamp)"
    )
    assert functions.ROUND_ROLLBACK_TYPEHASH().call() == keccak(
        text="RoundRollback(bytes32 run,uint64 round,bytes32 keptModelHash,"
        "bytes32 committeeRoot,bytes32 stateRoot,bytes32 reasonHash)"
    )
    # the contract computes the very digests the miners sign off chain
    assert functions.approvalDigest(approval.as_contract_tuple()).call() == approval.digest(
        trail.domain
    )
    rollback = trail.prepare_rollback(1, [m.address for m in miners], b"\x03" * 32)
    assert functions.rollbackDigest(rollback.as_contract_tuple()).call() == rollback.digest(
        trail.domain
    )
    assert functions.owner().call() == anvil_connection.operator.address
    assert functions.MAX_COMMITTEE_SIZE().call() == 64


def test_committee_root_matches_solidity_encode_packed(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    # the contract accepts a certificate only if keccak256(abi.encodePacked(miners)) matches
    ordered = sorted((m.address for m in miners), key=lambda a: int(a, 16))
    by_hand = keccak(b"".join(bytes(12) + bytes.fromhex(a[2:]) for a in ordered))
    assert committee_root(reversed(ordered)) == by_hand
    trail.anchor_round(certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners))


@pytest.mark.parametrize("committee_size", [1, 3, 4, 5, 6])
def test_quorum_boundary_is_exactly_ceil_two_thirds(anvil_connection, committee_size):
    miners = clients(committee_size)
    trail = deploy(anvil_connection, miners)
    required = quorum(committee_size)
    assert required == -(-2 * committee_size // 3)
    assert trail.contract.functions.quorum(committee_size).call() == required
    approval = approval_for(trail, 1, 1.0, miners)
    if required > 1:
        rejected = anchor_rejection(
            trail, certificate(trail, approval, miners, miners[: required - 1])
        )
        assert rejected.error_name == "QuorumNotReached"
        assert rejected.arguments == {"approvals": required - 1, "required": required}
    anchored = trail.anchor_round(certificate(trail, approval, miners, miners[:required]))
    assert anchored.round == 1
    assert trail.round_count() == 1


def test_off_chain_builder_refuses_below_quorum(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    signatures = {m.address: approval.sign(m, trail.domain) for m in miners[:3]}
    with pytest.raises(ValueError, match="quorum is 4"):
        AnchorCertificate.build(approval, [m.address for m in miners], signatures, trail.domain)
    # a fourth signature filed under the wrong address is dropped, not counted
    signatures[miners[4].address] = approval.sign(miners[3], trail.domain)
    with pytest.raises(ValueError, match="3 valid approvals"):
        AnchorCertificate.build(approval, [m.address for m in miners], signatures, trail.domain)


def test_builder_keeps_exactly_the_quorum_of_lowest_addresses(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    committee = [m.address for m in miners]
    ordered = [m.address for m in by_address(miners)]
    approval = approval_for(trail, 1, 1.0, miners, state_root=b"\x33" * 32)
    signatures = {m.address: approval.sign(m, trail.domain) for m in miners}

    built = AnchorCertificate.build(approval, committee, signatures, trail.domain)
    assert quorum(5) == 4
    assert built.committee == tuple(ordered)
    assert built.signers == tuple(ordered[:4])  # the highest address is left out
    assert built.signatures == tuple(signatures[a] for a in ordered[:4])
    assert len(built.packed_signatures) == 4 * 65

    # when the lowest miner's approval is invalid, the next four valid ones are kept
    broken = {**signatures, ordered[0]: signatures[ordered[1]]}
    rebuilt = AnchorCertificate.build(approval, committee, broken, trail.domain)
    assert rebuilt.signers == tuple(ordered[1:])

    anchored = trail.anchor_round(built)
    assert anchored.signers == built.signers
    (read_back,) = trail.anchored_rounds()
    assert read_back.signers == tuple(ordered[:4])
    assert read_back.signatures == built.signatures
    assert read_back.approval.state_root == b"\x33" * 32
    assert read_back.gas_used == anchored.gas_used


def test_more_signatures_than_the_quorum_are_accepted(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    ordered = by_address(miners)
    approval = approval_for(trail, 1, 1.0, miners)
    receipt = anchor_directly(
        trail,
        approval,
        [m.address for m in ordered],
        [approval.sign(m, trail.domain) for m in ordered],
    )
    assert receipt["status"] == 1
    assert trail.head() == (1, approval.model_hash)
    (read_back,) = trail.anchored_rounds()
    assert read_back.signers == tuple(m.address for m in ordered)
    assert len(read_back.signatures) == 5


def test_gas_of_a_quorum_certificate_is_at_most_70k(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, clients(10))
    gas = []
    for r in (1, 2, 3):
        approval = approval_for(trail, r, float(r), miners, state_root=bytes([r]) * 32)
        signatures = {m.address: approval.sign(m, trail.domain) for m in miners}
        built = AnchorCertificate.build(
            approval, [m.address for m in miners], signatures, trail.domain
        )
        gas.append(trail.anchor_round(built).gas_used)
    # the head is non-zero from deployment: the first round costs what later ones do
    assert max(gas) <= 70_000, gas
    assert max(gas) - min(gas) < 100, gas  # calldata zero bytes differ, storage does not
    # each signature beyond the quorum costs a recovery (several thousand gas)
    approval = approval_for(trail, 4, 4.0, miners, state_root=bytes([4]) * 32)
    ordered = by_address(miners)
    receipt = anchor_directly(
        trail,
        approval,
        [m.address for m in ordered],
        [approval.sign(m, trail.domain) for m in ordered],
    )
    assert int(receipt["gasUsed"]) > max(gas) + 3_000


def test_signer_outside_the_committee_is_rejected(anvil_connection):
    accounts = clients(7)
    miners = accounts[:5]
    trail = deploy(anvil_connection, accounts)
    approval = approval_for(trail, 1, 1.0, miners)
    rejected = anchor_rejection(
        trail, certificate(trail, approval, miners, [*miners[:3], accounts[6]])
    )
    assert rejected.error_name == "SignerNotInCommittee"
    assert rejected.arguments == {"signer": accounts[6].address}
    assert trail.round_count() == 0


def test_an_unregistered_signer_is_rejected_on_chain_until_registered(anvil_connection):
    miners = clients(3)
    outsider = miners[2]
    trail = deploy(anvil_connection, miners[:2])
    assert not trail.is_registered(outsider.address)
    approval = approval_for(trail, 1, 1.0, miners)
    rejected = anchor_rejection(trail, certificate(trail, approval, miners, miners))
    assert (rejected.error_name, rejected.arguments) == (
        "SignerNotRegistered",
        {"signer": outsider.address},
    )
    rejected = rollback_rejection(trail, rollback_certificate(trail, 1, miners))
    assert rejected.error_name == "SignerNotRegistered"
    # the two registered members are a quorum of three on their own
    trail.anchor_round(certificate(trail, approval, miners, miners[:2]))
    # registered now, the same member signs a valid round
    assert trail.register_clients({outsider.address: 100}) == 1
    trail.anchor_round(certificate(trail, approval_for(trail, 2, 2.0, miners), miners, miners))
    assert trail.head() == (2, model_hash(toy_model(2.0)))


def test_a_rollback_needs_a_certificate(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    unsigned = rollback_certificate(trail, 1, miners, signers=[])
    rejected = rollback_rejection(trail, unsigned)
    assert (rejected.error_name, rejected.arguments) == (
        "QuorumNotReached",
        {"approvals": 0, "required": 2},
    )
    # one miner's word is not the committee's
    rejected = rollback_rejection(trail, rollback_certificate(trail, 1, miners, signers=miners[:1]))
    assert rejected.error_name == "QuorumNotReached"
    # an approval of a commit does not certify a rollback
    approval = approval_for(trail, 1, 1.0, miners)
    misused = dataclasses.replace(
        rollback_certificate(trail, 1, miners),
        signatures=tuple(approval.sign(m, trail.domain) for m in by_address(miners)),
    )
    assert rollback_rejection(trail, misused).error_name == "SignerNotInCommittee"
    assert trail.latest_round() == 0
    trail.record_rollback(rollback_certificate(trail, 1, miners, signers=miners[:2]))
    assert trail.latest_round() == 1


def test_the_operator_certifies_a_rollback_alone_but_a_commit_only_if_deployed_to(
    anvil_connection,
):
    operator = anvil_connection.operator
    trail = deploy(anvil_connection, clients(3))
    approval = trail.prepare_approval(1, model_hash(toy_model(1.0)), bytes(32), [operator.address])
    alone = AnchorCertificate.operator_signed(approval, operator, trail.domain)
    assert anchor_rejection(trail, alone).error_name == "OperatorCannotCertify"
    rollback = trail.prepare_rollback(1, [operator.address], b"\x01" * 32, "no valid reply")
    rolled = trail.record_rollback(
        AnchorCertificate.operator_signed(rollback, operator, trail.domain)
    )
    assert rolled.signers == (operator.address,)
    assert trail.rollbacks() == [rolled]
    # a federation that admits unsigned clients deploys with operatorCertifies
    lenient = AuditTrail.deploy(anvil_connection, GENESIS, operator_certifies=True)
    assert lenient.operator_certifies()
    approval = lenient.prepare_approval(
        1, model_hash(toy_model(1.0)), bytes(32), [operator.address]
    )
    anchored = lenient.anchor_round(
        AnchorCertificate.operator_signed(approval, operator, lenient.domain)
    )
    assert anchored.signers == (operator.address,)


def test_a_certificate_of_one_run_is_rejected_by_another_at_the_same_address(tmp_path):
    """The embedded chain deploys every run at one address: only the run id tells them apart."""
    miners = clients(3)
    runs = []
    for name in ("first", "second"):
        connection = connect("embedded", tmp_path / name)
        runs.append((connection, deploy(connection, miners)))
    (first_connection, first), (second_connection, second) = runs
    try:
        assert first.address == second.address
        assert first.domain.chain_id == second.domain.chain_id
        assert first.domain.run != second.domain.run
        signed_in_first = certificate(
            trail=first,
            approval=approval_for(first, 1, 1.0, miners),
            committee=miners,
            signers=miners,
        )
        rejected = anchor_rejection(second, signed_in_first)
        assert rejected.error_name in ("SignerNotInCommittee", "SignaturesNotSorted")
        rolled_in_first = rollback_certificate(first, 1, miners)
        assert rollback_rejection(second, rolled_in_first).error_name in (
            "SignerNotInCommittee",
            "SignaturesNotSorted",
        )
        assert second.latest_round() == 0
        second.anchor_round(
            certificate(second, approval_for(second, 1, 1.0, miners), miners, miners)
        )
    finally:
        first_connection.close()
        second_connection.close()


def test_signature_of_another_statement_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)
    other = dataclasses.replace(approval, model_hash=model_hash(toy_model(9.0)))
    rejected = anchor_rejection(trail, dataclasses.replace(honest, approval=other))
    assert rejected.error_name == "SignerNotInCommittee"
    # the contract recovered the same stranger as the off-chain check does
    assert rejected.arguments == {"signer": other.recover(honest.signatures[0], trail.domain)}


def test_certificate_shape_errors(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)

    zero_model = dataclasses.replace(approval, model_hash=bytes(32))
    rejected = anchor_rejection(trail, dataclasses.replace(honest, approval=zero_model))
    assert rejected.error_name == "ZeroModelHash"

    rejected = anchor_rejection(trail, dataclasses.replace(honest, committee=()))
    assert (rejected.error_name, rejected.arguments) == ("InvalidCommitteeSize", {"size": 0})
    for size, error, arguments in (
        (65, "InvalidCommitteeSize", {"size": 65}),
        (64, "QuorumNotReached", {"approvals": 0, "required": 43}),  # the largest allowed
    ):
        crowd = tuple(to_checksum_address(i.to_bytes(20, "big")) for i in range(1, size + 1))
        crowd_approval = dataclasses.replace(approval, committee_root=committee_root(crowd))
        rejected = anchor_rejection(trail, AnchorCertificate(crowd_approval, crowd, (), ()))
        assert (rejected.error_name, rejected.arguments) == (error, arguments)

    rejected = anchor_rejection(
        trail, dataclasses.replace(honest, committee=tuple(reversed(honest.committee)))
    )
    assert (rejected.error_name, rejected.arguments) == ("CommitteeNotSorted", {"index": 1})
    with_zero = (ZERO_ADDRESS, *honest.committee[1:])
    zero_approval = dataclasses.replace(approval, committee_root=committee_root(with_zero))
    rejected = anchor_rejection(
        trail, dataclasses.replace(honest, approval=zero_approval, committee=with_zero)
    )
    assert (rejected.error_name, rejected.arguments) == ("CommitteeNotSorted", {"index": 0})

    fewer = honest.committee[:4]
    rejected = anchor_rejection(trail, dataclasses.replace(honest, committee=fewer))
    assert rejected.error_name == "CommitteeRootMismatch"
    assert rejected.arguments == {
        "expected": "0x" + committee_root(fewer).hex(),
        "got": "0x" + approval.committee_root.hex(),
    }

    truncated = with_signatures(honest, honest.signatures[0][:64], *honest.signatures[1:])
    rejected = anchor_rejection(trail, truncated)
    assert (rejected.error_name, rejected.arguments) == (
        "MalformedSignatures",
        {"length": 64 + 65 * 4},
    )
    assert trail.round_count() == 0
    trail.anchor_round(honest)


def test_high_s_malleable_signature_is_rejected_and_the_original_accepted(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)
    digest = approval.digest(trail.domain)
    web3 = anvil_connection.web3
    for index, original in enumerate(honest.signatures):
        s = int.from_bytes(original[32:64], "big")
        assert s <= CURVE_ORDER // 2  # eth-account signs canonically
        flipped_v = {27: 28, 28: 27}[original[64]]
        malleable = original[:32] + (CURVE_ORDER - s).to_bytes(32, "big") + bytes([flipped_v])
        # both recover to the miner under plain ecrecover: only the low-s rule tells them apart
        signer = honest.signers[index]
        assert ecrecover_precompile(web3, digest, original) == signer
        assert ecrecover_precompile(web3, digest, malleable) == signer
        signatures = list(honest.signatures)
        signatures[index] = malleable
        rejected = anchor_rejection(trail, with_signatures(honest, *signatures))
        assert (rejected.error_name, rejected.arguments) == ("InvalidSignature", {"index": index})
    assert trail.round_count() == 0
    anchored = trail.anchor_round(honest)
    assert anchored.signatures == honest.signatures
    assert trail.round_count() == 1


def test_bad_v_and_unrecoverable_signatures_are_rejected(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    honest = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
    first = honest.signatures[0]
    for broken in (
        first[:64] + bytes([first[64] - 27]),  # v in {0, 1}
        bytes(32) + first[32:],  # r = 0: ecrecover returns the zero address
    ):
        rejected = anchor_rejection(trail, with_signatures(honest, broken, *honest.signatures[1:]))
        assert (rejected.error_name, rejected.arguments) == ("InvalidSignature", {"index": 0})
    assert trail.round_count() == 0


def test_a_miner_signing_twice_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)
    lowest = by_address(miners)[0]
    signatures = honest.signatures  # sorted by signer: signatures[0] is the lowest miner's
    assert approval.recover(signatures[0], trail.domain) == lowest.address

    # the same signature twice: with two more it would reach the quorum of 4 by count
    rejected = anchor_rejection(trail, with_signatures(honest, signatures[0], *signatures[:3]))
    assert rejected.error_name == "SignaturesNotSorted"
    assert rejected.arguments == {"index": 1, "signer": lowest.address}

    # two different, individually valid signatures by the same key
    digest = approval.digest(trail.domain)
    second = sign_with_nonce(lowest, digest, nonce=0xC0FFEE)
    assert second != signatures[0]
    assert approval.recover(second, trail.domain) == lowest.address
    rejected = anchor_rejection(
        trail, with_signatures(honest, signatures[0], second, *signatures[1:3])
    )
    assert rejected.error_name == "SignaturesNotSorted"
    assert rejected.arguments == {"index": 1, "signer": lowest.address}

    # distinct miners out of order: the same error, at the first step backwards
    shuffled = (signatures[0], signatures[2], signatures[1], signatures[3])
    rejected = anchor_rejection(trail, with_signatures(honest, *shuffled))
    assert rejected.error_name == "SignaturesNotSorted"
    assert rejected.arguments == {"index": 2, "signer": honest.signers[1]}

    assert trail.round_count() == 0
    # the alternative signature is valid on its own: it replaces the original
    trail.anchor_round(with_signatures(honest, second, *signatures[1:4]))
    assert trail.round_count() == 1


# --------------------------------------------------------------------------------------
# Replays
# --------------------------------------------------------------------------------------


def test_certificate_replayed_to_a_later_round_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    cert = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
    trail.anchor_round(cert)
    # the same certificate again: the round is taken
    rejected = anchor_rejection(trail, cert)
    assert (rejected.error_name, rejected.arguments) == (
        "UnexpectedRound",
        {"expected": 2, "got": 1},
    )
    # the same signatures for round 2 (linked to the new head): they sign round 1 only
    later = approval_for(trail, 2, 1.0, miners)
    assert later.previous_hash == cert.approval.model_hash
    rejected = anchor_rejection(trail, dataclasses.replace(cert, approval=later))
    assert rejected.error_name == "SignerNotInCommittee"
    stranger = later.recover(cert.signatures[0], trail.domain)
    assert stranger not in cert.committee
    assert rejected.arguments == {"signer": stranger}
    assert trail.round_count() == 1
    # fresh signatures of round 2 are accepted
    trail.anchor_round(certificate(trail, later, miners, miners))
    assert trail.round_count() == 2


def test_certificate_replayed_to_another_contract_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    other = deploy(anvil_connection, miners)
    assert other.address != trail.address
    cert = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
    # round 1, the same genesis link, the same registered committee: only the domain differs
    assert approval_for(other, 1, 1.0, miners) == cert.approval
    rejected = anchor_rejection(other, cert)
    assert rejected.error_name == "SignerNotInCommittee"
    assert rejected.arguments == {"signer": cert.approval.recover(cert.signatures[0], other.domain)}
    assert other.round_count() == 0
    trail.anchor_round(cert)
    other.anchor_round(certificate(other, cert.approval, miners, miners))
    assert (trail.round_count(), other.round_count()) == (1, 1)


def test_certificate_replayed_to_another_chain_is_rejected(tmp_path):
    """The same deployer, nonce and contract address on two chains that differ by id only."""
    miners = clients(5)
    with ExitStack() as stack:
        trails = []
        for chain_id in (31337, 31338):
            url = stack.enter_context(anvil_with_chain_id(chain_id))
            connection = http_connection(url, tmp_path / str(chain_id))
            assert connection.chain_id == chain_id
            trails.append(deploy(connection, miners))
        home, foreign = trails
        assert home.address == foreign.address
        separators = {t.contract.functions.DOMAIN_SEPARATOR().call() for t in trails}
        assert len(separators) == 2

        cert = certificate(home, approval_for(home, 1, 1.0, miners), miners, miners)
        assert approval_for(foreign, 1, 1.0, miners) == cert.approval
        home.anchor_round(cert)
        rejected = anchor_rejection(foreign, cert)
        assert rejected.error_name == "SignerNotInCommittee"
        assert rejected.arguments == {
            "signer": cert.approval.recover(cert.signatures[0], foreign.domain)
        }
        assert foreign.round_count() == 0
        foreign.anchor_round(certificate(foreign, cert.approval, miners, miners))
        assert foreign.round_count() == 1


def test_domain_follows_a_change_of_chain_id(tmp_path):
    """After a fork to a new chain id, signatures under the old id no longer verify."""
    miners = clients(3)
    with anvil_with_chain_id(31338) as url:
        connection = http_connection(url, tmp_path)
        trail = deploy(connection, miners)
        approval = approval_for(trail, 1, 1.0, miners)
        old = certificate(trail, approval, miners, miners)
        functions = trail.contract.functions
        owner = connection.operator.address

        def anchor_call(cert):
            return functions.anchorRound(
                cert.approval.as_contract_tuple(), list(cert.committee), cert.packed_signatures
            )

        anchor_call(old).call({"from": owner})
        connection.web3.provider.make_request("anvil_setChainId", [31339])
        assert connection.web3.eth.chain_id == 31339
        forked = Eip712Domain(31339, trail.address, trail.domain.run)
        assert functions.DOMAIN_SEPARATOR().call() == approval.signable(forked).header
        assert functions.approvalDigest(approval.as_contract_tuple()).call() == (
            approval.digest(forked)
        )
        rejected = rejection_for(trail, anchor_call(old), owner)
        assert rejected.error_name == "SignerNotInCommittee"
        assert rejected.arguments == {"signer": approval.recover(old.signatures[0], forked)}
        ordered = by_address(miners)
        renewed = with_signatures(old, *(approval.sign(m, forked) for m in ordered))
        anchor_call(renewed).call({"from": owner})


def test_signature_for_another_chain_id_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    foreign = Eip712Domain(chain_id=1, verifying_contract=trail.address, run=trail.domain.run)
    assert trail.domain.chain_id == 31337
    ordered = by_address(miners)
    cert = AnchorCertificate(
        approval,
        tuple(m.address for m in ordered),
        tuple(m.address for m in ordered),
        tuple(approval.sign(m, foreign) for m in ordered),
    )
    rejected = anchor_rejection(trail, cert)
    assert rejected.error_name == "SignerNotInCommittee"
    assert rejected.arguments == {"signer": approval.recover(cert.signatures[0], trail.domain)}
    # and the off-chain builder drops every one of them
    with pytest.raises(ValueError, match="0 valid approvals"):
        AnchorCertificate.build(
            approval,
            [m.address for m in miners],
            dict(zip(cert.signers, cert.signatures, strict=True)),
            trail.domain,
        )


# --------------------------------------------------------------------------------------
# Hash links and rollbacks
# --------------------------------------------------------------------------------------


def test_broken_hash_link_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    stray = model_hash(toy_model(5.0))
    approval = dataclasses.replace(approval_for(trail, 1, 1.0, miners), previous_hash=stray)
    rejected = anchor_rejection(trail, certificate(trail, approval, miners, miners))
    assert rejected.error_name == "BrokenHashLink"
    # the head keeps the first 24 bytes of keccak256(abi.encode(hash)), not the hash
    expected = {"expectedDigest": head_digest(GENESIS), "got": "0x" + stray.hex()}
    assert rejected.arguments == expected
    # a rollback must keep the last anchored model, too
    rejected = rollback_rejection(trail, rollback_certificate(trail, 1, miners), kept=stray)
    assert (rejected.error_name, rejected.arguments) == ("BrokenHashLink", expected)
    assert trail.latest_round() == 0

    # after an anchor, the link is to the new head and no longer to the genesis
    trail.anchor_round(certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners))
    one = model_hash(toy_model(1.0))
    back_to_genesis = dataclasses.replace(
        approval_for(trail, 2, 2.0, miners), previous_hash=GENESIS
    )
    rejected = anchor_rejection(trail, certificate(trail, back_to_genesis, miners, miners))
    assert (rejected.error_name, rejected.arguments) == (
        "BrokenHashLink",
        {"expectedDigest": head_digest(one), "got": "0x" + GENESIS.hex()},
    )
    rejected = rollback_rejection(trail, rollback_certificate(trail, 2, miners), kept=GENESIS)
    assert (rejected.error_name, rejected.arguments) == (
        "BrokenHashLink",
        {"expectedDigest": head_digest(one), "got": "0x" + GENESIS.hex()},
    )
    assert trail.head() == (1, one)
    assert trail.latest_round() == 1


def test_rollback_keeps_the_head_and_the_next_round_links_past_it(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    one = model_hash(toy_model(1.0))
    trail.anchor_round(certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners))
    state_root = b"\x5a" * 32
    rolled = trail.record_rollback(
        rollback_certificate(trail, 2, miners, state_root, reason="validators did not reach 2/3")
    )
    assert rolled.kept_model_hash == one
    assert rolled.state_root == state_root
    assert trail.latest_round() == 2
    # the head's model is unchanged, still round 1's
    assert trail.head() == (1, one)
    assert trail.contract.functions.isLatestModel(one).call()
    (event,) = trail.contract.events.RoundRolledBack.get_logs(from_block=trail.deploy_block)
    assert dict(event["args"]) == {
        "round": 2,
        "keptModelHash": one,
        "committeeRoot": committee_of(miners),
        "stateRoot": state_root,
        "reason": "validators did not reach 2/3",
    }
    assert event["transactionHash"].to_0x_hex() == rolled.tx_hash
    with pytest.raises(ChainRejectedError) as raised:
        trail.record_rollback(rollback_certificate(trail, 2, miners, reason="again"))
    assert raised.value.error_name == "UnexpectedRound"
    assert raised.value.arguments == {"expected": 3, "got": 2}
    third = approval_for(trail, 3, 3.0, miners)
    assert third.previous_hash == one
    trail.anchor_round(certificate(trail, third, miners, miners))
    # a rollback without a state statement records the zero root
    trail.record_rollback(rollback_certificate(trail, 4, miners, reason="no candidate"))

    three = model_hash(toy_model(3.0))
    rollbacks = trail.rollbacks()
    assert rollbacks[0] == rolled
    assert [(r.round, r.kept_model_hash, r.state_root, r.reason) for r in rollbacks] == [
        (2, one, state_root, "validators did not reach 2/3"),
        (4, three, bytes(32), "no candidate"),
    ]
    assert trail.get_blockchain() == [(0, GENESIS), (1, one), (3, three)]
    assert trail.get_blockchain(2, 2) == []
    assert trail.get_blockchain(2) == [(3, three)]
    assert trail.round_count() == 2
    assert trail.latest_round() == 4
    assert trail.head() == (3, three)
    with pytest.raises(RoundNotAnchoredError):
        trail.get_round(2)


def execution_gas(connection, anchored) -> int:
    """Gas an anchor used beyond the transaction's base cost and its calldata's."""
    data = bytes(connection.web3.eth.get_transaction(anchored.tx_hash)["input"])
    calldata = sum(4 if byte == 0 else 16 for byte in data)
    return anchored.gas_used - 21_000 - calldata


def test_gas_per_anchor_does_not_grow_with_registered_clients(tmp_path):
    """Identical anchors cost identical execution gas with 10 and with 100 registered clients.

    Each size gets its own fresh anvil, so the contract lands at the same address on the
    same chain id. The run ids differ (each deployment draws a salt), so the signatures
    differ and with them the calldata's cost (4 gas a zero byte, 16 any other): that is
    subtracted, and any difference left could only come from the registered clients.
    """
    gas = {}
    for registered in (10, 100):
        with running_anvil() as url:
            connection = http_connection(url, tmp_path / str(registered))
            accounts = clients(registered)
            miners = accounts[:5]
            trail = AuditTrail.deploy(connection, GENESIS)
            trail.register_clients({account.address: 100 for account in accounts})
            assert trail.client_count() == registered
            gas[registered] = [
                execution_gas(
                    connection,
                    trail.anchor_round(
                        certificate(trail, approval_for(trail, r, float(r), miners), miners, miners)
                    ),
                )
                for r in (1, 2, 3)
            ]
            gas[(registered, "address")] = trail.address
    assert gas[(10, "address")] == gas[(100, "address")]
    assert gas[10] == gas[100]


# --------------------------------------------------------------------------------------
# Embedded backend
# --------------------------------------------------------------------------------------


def test_embedded_backend_runs_the_cancun_bytecode_and_anchors(tmp_path):
    miners = clients(5)
    with connect("embedded", tmp_path / "chain") as connection:
        trail = AuditTrail.open(connection, GENESIS)
        trail.register_clients({m.address: 1 for m in miners})
        approval = approval_for(trail, 1, 1.0, miners)
        signatures = {m.address: approval.sign(m, trail.domain) for m in miners}
        built = AnchorCertificate.build(
            approval, [m.address for m in miners], signatures, trail.domain
        )
        anchored = trail.anchor_round(built)
        assert connection.web3.eth.get_transaction_receipt(anchored.tx_hash)["status"] == 1
        assert trail.head() == (1, approval.model_hash)
        assert trail.anchored_rounds()[0].signers == built.signers
        with pytest.raises(ChainRejectedError) as raised:
            trail.anchor_round(built)
        assert raised.value.error_name == "UnexpectedRound"
