"""BCSFLAudit against a real anvil (started by the fixture), plus the embedded backend."""

from __future__ import annotations

import dataclasses

import pytest
from chain_fixtures import (
    GENESIS,
    approval_for,
    certificate,
    clients,
    deploy,
    http_connection,
    running_anvil,
    toy_model,
)
from eth_utils import keccak
from web3.exceptions import ContractLogicError

from bcsfl_flower.chain.audit import AnchorCertificate, AuditTrail, quorum
from bcsfl_flower.chain.backends import connect
from bcsfl_flower.chain.compiler import ARTIFACT_PATH, compile_contract, load_artifact
from bcsfl_flower.chain.errors import ChainRejectedError, decode_custom_error, revert_data
from bcsfl_flower.chain.keys import dev_account
from bcsfl_flower.packets import Eip712Domain, committee_root, model_hash


@pytest.fixture(scope="module")
def anvil_url():
    with running_anvil() as url:
        yield url


@pytest.fixture()
def anvil_connection(anvil_url, tmp_path):
    return http_connection(anvil_url, tmp_path)


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


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------


def test_owner_registers_clients_with_stakes(anvil_connection):
    accounts = clients(3)
    trail = deploy(anvil_connection, accounts[:2])
    assert trail.client_count() == 2
    assert trail.is_registered(accounts[0].address)
    assert not trail.is_registered(accounts[2].address)
    assert trail.stake_of(accounts[1].address) == 100
    trail.set_stake(accounts[1].address, 7)
    assert trail.stake_of(accounts[1].address) == 7
    events = trail.contract.events.ClientRegistered.get_logs(from_block=trail.deploy_block)
    assert [e["args"]["client"] for e in events] == [a.address for a in accounts[:2]]
    # registering again is a no-op for the binding, a revert for the contract
    assert trail.register_clients({accounts[0].address: 1, accounts[2].address: 5}) == 1
    assert trail.client_count() == 3
    with pytest.raises(ChainRejectedError) as raised:
        trail._transact(
            "registerClient",
            lambda: trail.contract.functions.registerClient(accounts[0].address, 1),
            gas=200_000,
            resume={},
        )
    assert raised.value.error_name == "AlreadyRegistered"


def test_non_owner_registration_reverts_with_custom_error(anvil_connection):
    trail = deploy(anvil_connection, [])
    outsider = dev_account(9)
    web3 = anvil_connection.web3
    function = trail.contract.functions.registerClient(outsider.address, 1)
    with pytest.raises(ContractLogicError) as raised:
        function.call({"from": outsider.address})
    name, arguments = decode_custom_error(trail.abi, revert_data(raised.value))
    assert (name, arguments) == ("NotOwner", {"caller": outsider.address})
    # a mined transaction from the outsider fails too and changes nothing
    tx = function.build_transaction(
        {
            "from": outsider.address,
            "gas": 200_000,
            "nonce": web3.eth.get_transaction_count(outsider.address),
        }
    )
    receipt = web3.eth.wait_for_transaction_receipt(
        web3.eth.send_raw_transaction(outsider.sign_transaction(tx).raw_transaction)
    )
    assert receipt["status"] == 0
    assert not trail.is_registered(outsider.address)
    assert trail.client_count() == 0


# --------------------------------------------------------------------------------------
# Anchoring
# --------------------------------------------------------------------------------------


def test_anchoring_stores_links_and_lists_rounds(anvil_connection):
    accounts = clients(6)
    miners = accounts[:5]
    trail = deploy(anvil_connection, accounts)
    assert trail.head() == (0, GENESIS)

    first = approval_for(trail, 1, 1.0, miners)
    assert first.previous_hash == GENESIS
    assert trail.contract.functions.approvalDigest(first.as_contract_tuple()).call() == (
        first.digest(trail.domain)
    )
    anchored = trail.anchor_round(certificate(trail, first, miners, miners))
    assert anchored.round == 1
    assert anvil_connection.web3.eth.get_transaction_receipt(anchored.tx_hash)["status"] == 1

    second = approval_for(trail, 2, 2.0, miners)
    assert second.previous_hash == model_hash(toy_model(1.0))
    trail.anchor_round(certificate(trail, second, miners, miners[:4]))

    assert trail.head() == (2, model_hash(toy_model(2.0)))
    assert trail.get_round(1) == model_hash(toy_model(1.0))
    assert trail.round_count() == 2
    rounds, hashes = trail.contract.functions.getBlockchain(0, 99).call()
    assert rounds == [0, 1, 2]
    assert hashes == [GENESIS, model_hash(toy_model(1.0)), model_hash(toy_model(2.0))]
    read_back = trail.anchored_rounds()
    assert [r.round for r in read_back] == [1, 2]
    assert [len(r.signers) for r in read_back] == [5, 4]
    assert read_back[1].approval == second
    with pytest.raises(ChainRejectedError) as raised:
        trail.get_round(3)
    assert raised.value.error_name == "RoundNotAnchored"


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
        with pytest.raises(ChainRejectedError) as raised:
            trail.anchor_round(certificate(trail, approval, miners, miners[: required - 1]))
        assert raised.value.error_name == "QuorumNotReached"
        assert raised.value.arguments == {"approvals": required - 1, "required": required}
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


def test_signer_outside_the_committee_is_rejected(anvil_connection):
    accounts = clients(7)
    miners = accounts[:5]
    trail = deploy(anvil_connection, accounts)
    approval = approval_for(trail, 1, 1.0, miners)
    wrong = certificate(trail, approval, miners, [*miners[:3], accounts[6]])
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(wrong)
    assert raised.value.error_name == "SignerNotInCommittee"
    assert raised.value.arguments == {"signer": accounts[6].address}
    assert trail.round_count() == 0


def test_unregistered_committee_member_cannot_sign(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners[:2])
    approval = approval_for(trail, 1, 1.0, miners)
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(certificate(trail, approval, miners, miners))
    assert raised.value.error_name == "SignerNotEligible"
    assert raised.value.arguments == {"signer": miners[2].address}


def test_signature_of_another_statement_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)
    other = dataclasses.replace(approval, model_hash=model_hash(toy_model(9.0)))
    tampered = dataclasses.replace(honest, approval=other)
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(tampered)
    assert raised.value.error_name == "SignerNotInCommittee"


def test_replayed_certificate_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    cert = certificate(trail, approval, miners, miners)
    trail.anchor_round(cert)
    # the same certificate again: the round is taken
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(cert)
    assert raised.value.error_name == "UnexpectedRound"
    assert raised.value.arguments == {"expected": 2, "got": 1}
    # the same signatures for the next round: they do not recover to the miners
    next_round = approval_for(trail, 2, 1.0, miners)
    replay = dataclasses.replace(cert, approval=next_round)
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(replay)
    assert raised.value.error_name == "SignerNotInCommittee"
    # the same certificate on another deployment of the contract
    other = deploy(anvil_connection, miners)
    with pytest.raises(ChainRejectedError) as raised:
        other.anchor_round(cert)
    assert raised.value.error_name == "SignerNotInCommittee"
    assert trail.round_count() == 1
    assert other.round_count() == 0


def test_signature_for_another_chain_id_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    foreign = Eip712Domain(chain_id=1, verifying_contract=trail.address)
    assert trail.domain.chain_id == 31337
    ordered = sorted(miners, key=lambda m: int(m.address, 16))
    cert = AnchorCertificate(
        approval,
        tuple(m.address for m in ordered),
        tuple(m.address for m in ordered),
        tuple(approval.sign(m, foreign) for m in ordered),
    )
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(cert)
    assert raised.value.error_name == "SignerNotInCommittee"
    # and the off-chain builder drops every one of them
    with pytest.raises(ValueError, match="0 valid approvals"):
        AnchorCertificate.build(
            approval,
            [m.address for m in miners],
            dict(zip(cert.signers, cert.signatures, strict=True)),
            trail.domain,
        )


def test_broken_hash_link_is_rejected(anvil_connection):
    miners = clients(5)
    trail = deploy(anvil_connection, miners)
    approval = dataclasses.replace(
        approval_for(trail, 1, 1.0, miners), previous_hash=model_hash(toy_model(5.0))
    )
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(certificate(trail, approval, miners, miners))
    assert raised.value.error_name == "BrokenHashLink"
    assert raised.value.arguments["expected"] == "0x" + GENESIS.hex()


def test_malformed_signatures_are_rejected(anvil_connection):
    curve_order = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    approval = approval_for(trail, 1, 1.0, miners)
    honest = certificate(trail, approval, miners, miners)
    first = honest.signatures[0]
    high_s = (curve_order - int.from_bytes(first[32:64], "big")).to_bytes(32, "big")
    malleable = first[:32] + high_s + bytes([55 - first[64]])  # the other valid (r, s, v)
    bad_v = first[:64] + bytes([first[64] - 27])
    for broken in (malleable, bad_v):
        cert = dataclasses.replace(honest, signatures=(broken, *honest.signatures[1:]))
        with pytest.raises(ChainRejectedError) as raised:
            trail.anchor_round(cert)
        assert raised.value.error_name == "InvalidSignature"
    duplicated = dataclasses.replace(
        honest,
        signers=honest.signers[:1] * 3,
        signatures=honest.signatures[:1] * 3,
    )
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(duplicated)
    assert raised.value.error_name == "SignerNotInCommittee"
    unsorted = dataclasses.replace(honest, committee=tuple(reversed(honest.committee)))
    with pytest.raises(ChainRejectedError) as raised:
        trail.anchor_round(unsorted)
    assert raised.value.error_name == "CommitteeNotSorted"
    assert trail.round_count() == 0


def test_rollback_keeps_the_head_and_the_next_round_links_past_it(anvil_connection):
    miners = clients(3)
    trail = deploy(anvil_connection, miners)
    trail.anchor_round(certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners))
    rolled = trail.record_rollback(2, "validators did not reach 2/3")
    assert rolled.kept_model_hash == model_hash(toy_model(1.0))
    assert trail.latest_round() == 2
    with pytest.raises(ChainRejectedError) as raised:
        trail.record_rollback(2, "again")
    assert raised.value.error_name == "UnexpectedRound"
    third = approval_for(trail, 3, 3.0, miners)
    assert third.previous_hash == model_hash(toy_model(1.0))
    trail.anchor_round(certificate(trail, third, miners, miners))
    assert [r.round for r in trail.rollbacks()] == [2]
    assert trail.contract.functions.getBlockchain(0, 9).call()[0] == [0, 1, 3]
    assert trail.contract.functions.rollbackCount().call() == 1


def test_gas_per_anchor_does_not_grow_with_registered_clients(tmp_path):
    """Identical anchors cost identical gas with 10 and with 100 registered clients.

    Each size gets its own fresh anvil, so the contract lands at the same address on the
    same chain id: the signatures, hence the calldata, are byte-identical and any gas
    difference could only come from the number of registered clients.
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
                trail.anchor_round(
                    certificate(trail, approval_for(trail, r, float(r), miners), miners, miners)
                ).gas_used
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
