"""Canonical model hash, EIP-712 packets, the packet verifier, and signing keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest
from eth_account import Account
from flwr.app import Array, ArrayRecord

from bcsfl_flower.approvals import (
    RoundApproval,
    committee_root,
)
from bcsfl_flower.chain.keys import (
    KEYSTORE_PASSWORD_ENV,
    client_dev_account,
    dev_account,
    load_keystore,
)
from bcsfl_flower.packets import Eip712Domain as Domain
from bcsfl_flower.packets import (
    ModelPacket,
    PacketRejectedError,
    PacketVerifier,
    RejectReason,
    SignedModelPacket,
    _canonical_array,
    accepted_root,
    model_hash,
    npy_view,
    recover_signer,
)

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
DOMAIN = Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", bytes(range(32)))
NOW = 1_750_000_000.0


def tiny_model() -> dict[str, np.ndarray]:
    return {
        "weight": np.array([[1.0, -2.0], [0.5, 3.25]], dtype=np.float32),
        "bias": np.array([7], dtype=np.int64),
        "mask": np.array(True),
    }


def as_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


# --------------------------------------------------------------------------------------
# Canonical hash
# --------------------------------------------------------------------------------------


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def test_model_hash_matches_the_documented_encoding_built_by_hand():
    encoding = b""
    # keys in sorted order: bias, mask, weight
    encoding += u64(4) + b"bias" + u64(3) + b"<i8" + u64(1) + u64(1)
    encoding += u64(8) + struct.pack("<q", 7)
    encoding += u64(4) + b"mask" + u64(3) + b"|b1" + u64(0)
    encoding += u64(1) + b"\x01"
    encoding += u64(6) + b"weight" + u64(3) + b"<f4" + u64(2) + u64(2) + u64(2)
    encoding += u64(16) + struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    assert model_hash(tiny_model()) == hashlib.sha256(encoding).digest()


def test_model_hash_known_vector_is_pinned():
    # If this changes, every anchored hash of every past run stops verifying.
    assert model_hash(tiny_model()).hex() == (
        "c44d25f1ee2917840d97c1ec9bae55871cd262b97d792e47a5dc02e580022268"
    )


def test_model_hash_ignores_order_byte_order_and_memory_layout():
    reference = model_hash(tiny_model())
    model = tiny_model()
    reordered = {key: model[key] for key in reversed(list(model))}
    big_endian = {key: value.astype(value.dtype.newbyteorder(">")) for key, value in model.items()}
    fortran = {  # np.asfortranarray would turn the 0-d mask into shape (1,)
        key: np.asfortranarray(value) if value.ndim else value for key, value in model.items()
    }
    strided = {**model, "weight": np.ascontiguousarray(model["weight"].T).T}
    assert not strided["weight"].flags.c_contiguous
    for variant in (reordered, big_endian, fortran, strided):
        assert model_hash(variant) == reference
        assert model_hash(as_record(variant)) == reference


def test_model_hash_changes_with_any_field():
    reference = model_hash(tiny_model())
    model = tiny_model()
    variants = [
        {**model, "weight": model["weight"] + np.float32(1e-6)},
        {**model, "weight": model["weight"].astype(np.float64)},
        {**model, "weight": model["weight"].reshape(4)},
        {**model, "weight": model["weight"].reshape(1, 4)},
        {("Weight" if key == "weight" else key): value for key, value in model.items()},
        {key: value for key, value in model.items() if key != "mask"},
        # moving bytes across a field boundary must not collide (length prefixes)
        {"bia": model["bias"], "smask": model["mask"], "weight": model["weight"]},
    ]
    hashes = {model_hash(variant) for variant in variants}
    assert reference not in hashes
    assert len(hashes) == len(variants)


def test_model_hash_copies_nothing_for_canonical_arrays():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    same = _canonical_array("a", array)
    assert np.shares_memory(same, array)
    record_array = Array(array)
    view = npy_view(record_array)
    assert not view.flags.owndata
    base = view
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert base is record_array.data
    assert np.array_equal(view, array)
    # exactly one conversion when needed
    converted = _canonical_array("a", array.astype(">f4"))
    assert converted.dtype.str == "<f4" and converted.flags.c_contiguous


def test_model_hash_rejects_what_has_no_canonical_bytes():
    with pytest.raises(TypeError, match="'names'"):
        model_hash({"names": np.array(["a", "b"])})
    with pytest.raises(TypeError, match="object"):
        model_hash({"o": np.array([object()], dtype=object)})
    with pytest.raises(TypeError, match="keys must be str"):
        model_hash({1: np.zeros(1)})
    with pytest.raises(TypeError, match="not an array"):
        model_hash({"x": [1, 2]})
    with pytest.raises(TypeError, match="ArrayRecord or a Mapping"):
        model_hash([np.zeros(1)])


def test_model_hash_handles_empty_and_scalar_arrays():
    empty = model_hash({})
    assert empty == hashlib.sha256(b"").digest()
    scalar = {"s": np.array(2.5)}
    assert model_hash(scalar) == model_hash(as_record(scalar))
    assert model_hash({"z": np.zeros((0, 3), np.float32)}) != model_hash(
        {"z": np.zeros((3, 0), np.float32)}
    )


# --------------------------------------------------------------------------------------
# EIP-712
# --------------------------------------------------------------------------------------


def signed_packet(account=None, *, round_number=3, timestamp=int(NOW), arrays=None):
    account = account or client_dev_account(0)
    packet = ModelPacket(
        model_hash=model_hash(arrays if arrays is not None else tiny_model()),
        timestamp=timestamp,
        round=round_number,
        client=account.address,
    )
    return packet.sign(account, DOMAIN)


def test_packet_signature_recovers_to_the_client_and_survives_a_config_record():
    signed = signed_packet()
    assert signed.recover(DOMAIN) == client_dev_account(0).address
    parsed = SignedModelPacket.from_config_record(signed.to_config_record())
    assert parsed == signed


def test_signature_is_bound_to_chain_and_contract():
    signed = signed_packet()
    other_chain = Domain(1, DOMAIN.verifying_contract, DOMAIN.run)
    other_contract = Domain(DOMAIN.chain_id, "0x" + "11" * 20, DOMAIN.run)
    assert signed.recover(other_chain) != signed.packet.client
    assert signed.recover(other_contract) != signed.packet.client
    assert signed.packet.digest(DOMAIN) != signed.packet.digest(other_chain)


def test_a_signature_is_bound_to_its_run():
    """The embedded chain deploys every run's contract at one address: the run tells them apart."""
    signed = signed_packet()
    other_run = Domain(DOMAIN.chain_id, DOMAIN.verifying_contract, bytes(32))
    assert signed.recover(other_run) != signed.packet.client
    with pytest.raises(ValueError, match="run must be 32 bytes"):
        Domain(DOMAIN.chain_id, DOMAIN.verifying_contract, b"run")


def test_malleable_or_malformed_signatures_are_refused():
    signed = signed_packet()
    signature = signed.signature
    high_s = (CURVE_ORDER - int.from_bytes(signature[32:64], "big")).to_bytes(32, "big")
    twin = signature[:32] + high_s + bytes([55 - signature[64]])
    with pytest.raises(ValueError, match="malleable"):
        recover_signer(signed.packet.signable(DOMAIN), twin)
    with pytest.raises(ValueError, match="v must be 27 or 28"):
        recover_signer(signed.packet.signable(DOMAIN), signature[:64] + b"\x00")
    with pytest.raises(ValueError, match="65 bytes"):
        recover_signer(signed.packet.signable(DOMAIN), signature[:64])


def test_a_packet_can_only_be_signed_by_its_client():
    packet = signed_packet().packet
    with pytest.raises(ValueError, match="cannot sign a packet of"):
        packet.sign(client_dev_account(1), DOMAIN)


def round_four() -> RoundApproval:
    """A round-4 approval by a one-miner committee, with distinct byte patterns."""
    return RoundApproval(
        round=4,
        model_hash=b"\x01" * 32,
        previous_hash=b"\x02" * 32,
        accepted_root=b"\x03" * 32,
        committee_root=committee_root([client_dev_account(0).address]),
        state_root=b"\x04" * 32,
        timestamp=int(NOW),
    )


def test_round_approval_round_trips_and_recovers():
    approval = round_four()
    miner = client_dev_account(0)
    signature = approval.sign(miner, DOMAIN)
    assert approval.recover(signature, DOMAIN) == miner.address
    later = dataclasses.replace(approval, round=5)
    assert later.recover(signature, DOMAIN) != miner.address
    # the state root is part of the signed statement, between committee root and timestamp
    other_state = dataclasses.replace(approval, state_root=b"\x05" * 32)
    assert other_state.recover(signature, DOMAIN) != miner.address
    assert approval.as_contract_tuple() == (
        4,
        b"\x01" * 32,
        b"\x02" * 32,
        b"\x03" * 32,
        approval.committee_root,
        b"\x04" * 32,
        int(NOW),
    )
    with pytest.raises(ValueError, match="state_root must be 32 bytes"):
        dataclasses.replace(approval, state_root=b"\x04" * 31)


def test_round_approval_survives_a_config_record():
    """A miner duty message carries the approval, state root included, as a ConfigRecord."""
    approval = round_four()
    assert RoundApproval.from_config_record(approval.to_config_record()) == approval


def test_typed_data_rejects_out_of_range_fields():
    with pytest.raises(ValueError, match="model_hash must be 32 bytes"):
        ModelPacket(b"\x00" * 31, 1, 1, client_dev_account(0).address)
    with pytest.raises(ValueError, match="round must fit in uint64"):
        ModelPacket(b"\x00" * 32, 1, 2**64, client_dev_account(0).address)
    with pytest.raises(ValueError, match="client must be an address"):
        ModelPacket(b"\x00" * 32, 1, 1, "alice")
    with pytest.raises(ValueError, match="chain_id must be >= 1"):
        Domain(0, DOMAIN.verifying_contract, DOMAIN.run)
    with pytest.raises(ValueError, match="packet field 'round' must be int"):
        record = signed_packet().to_config_record()
        record["round"] = "3"
        SignedModelPacket.from_config_record(record)


def test_roots_do_not_depend_on_order():
    addresses = [client_dev_account(i).address for i in range(4)]
    assert committee_root(addresses) == committee_root(reversed(addresses))
    assert committee_root(addresses) != committee_root(addresses[:3])
    with pytest.raises(ValueError, match="twice"):
        committee_root([addresses[0], addresses[0].lower()])
    packets = [signed_packet(client_dev_account(i)) for i in range(3)]
    assert accepted_root(packets, DOMAIN) == accepted_root(list(reversed(packets)), DOMAIN)
    assert accepted_root(packets, DOMAIN) != accepted_root(packets[:2], DOMAIN)
    assert accepted_root([], DOMAIN) == bytes(32)


# --------------------------------------------------------------------------------------
# PacketVerifier
# --------------------------------------------------------------------------------------


def verifier(*accounts, window_s=60.0):
    registered = [a.address for a in accounts] or [client_dev_account(0).address]
    return PacketVerifier(
        DOMAIN, registered, window_s=window_s, clock_skew_s=5.0, clock=lambda: NOW
    )


def rejection(check) -> RejectReason:
    with pytest.raises(PacketRejectedError) as raised:
        check()
    return raised.value.reason


def test_verifier_accepts_a_good_packet_from_a_config_record():
    accepted = verifier().verify(signed_packet().to_config_record(), as_record(tiny_model()), 3)
    assert accepted.packet.client == client_dev_account(0).address


def test_verifier_rejects_unregistered_signer():
    check = verifier(client_dev_account(1))
    assert rejection(lambda: check.verify(signed_packet(), tiny_model(), 3)) == (
        RejectReason.UNREGISTERED
    )


def test_verifier_rejects_wrong_round():
    check = verifier()
    assert rejection(lambda: check.verify(signed_packet(round_number=2), tiny_model(), 3)) == (
        RejectReason.WRONG_ROUND
    )


@pytest.mark.parametrize("offset", [-61, 6])
def test_verifier_rejects_timestamps_outside_the_window(offset):
    check = verifier()
    stale = signed_packet(timestamp=int(NOW) + offset)
    assert rejection(lambda: check.verify(stale, tiny_model(), 3)) == RejectReason.STALE
    # just inside both edges is fine
    check.verify(signed_packet(timestamp=int(NOW) - 60), tiny_model(), 3)


def test_verifier_rejects_a_second_packet_from_the_same_signer():
    check = verifier()
    check.verify(signed_packet(), tiny_model(), 3)
    again = signed_packet(timestamp=int(NOW) - 1)
    assert rejection(lambda: check.verify(again, tiny_model(), 3)) == RejectReason.DUPLICATE
    # the next round is a new round
    check.verify(signed_packet(round_number=4), tiny_model(), 4)


def test_verifier_rejects_a_hash_that_does_not_match_the_arrays():
    check = verifier()
    tampered = {**tiny_model(), "bias": np.array([8], dtype=np.int64)}
    assert rejection(lambda: check.verify(signed_packet(), tampered, 3)) == (
        RejectReason.HASH_MISMATCH
    )
    # a rejected packet does not count as seen: the honest one still gets in
    check.verify(signed_packet(), tiny_model(), 3)


def test_verifier_rejects_bad_signatures_and_impersonation():
    check = verifier(client_dev_account(0), client_dev_account(1))
    signed = signed_packet()
    corrupted = dataclasses.replace(
        signed,
        signature=signed.signature[:10] + bytes([signed.signature[10] ^ 1]) + signed.signature[11:],
    )
    assert rejection(lambda: check.verify(corrupted, tiny_model(), 3)) == RejectReason.BAD_SIGNATURE
    # client 1 signs a packet that claims to be from client 0
    claimed = signed.packet
    forged = SignedModelPacket(
        claimed, client_dev_account(1).sign_message(claimed.signable(DOMAIN)).signature
    )
    assert rejection(lambda: check.verify(forged, tiny_model(), 3)) == RejectReason.BAD_SIGNATURE


def _garbled_arrays() -> dict[str, bytes]:
    good = Array(np.arange(6, dtype=np.float32)).data
    header_end = good.index(b"\n") + 1
    return {
        "not npy at all": b"\x00garbage",
        "truncated payload": good[:-5],
        "header that claims a larger shape": good.replace(b"(6,)", b"(9,)"),
        "header that does not parse": good[:10] + b"{'descr': <f4" + good[23:header_end],
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(_garbled_arrays()))
def test_a_signed_packet_whose_array_bytes_are_garbage_is_malformed_not_a_crash(case):
    # A registered client signs the hash it claims and sends bytes numpy cannot read.
    garbled = Array(
        dtype="float32", shape=(6,), stype="numpy.ndarray", data=_garbled_arrays()[case]
    )
    record = ArrayRecord({"weight": garbled})
    reason = rejection(lambda: verifier().verify(signed_packet(), record, 3))
    assert reason == RejectReason.MALFORMED


def test_verifier_reports_malformed_records():
    record = signed_packet().to_config_record()
    del record["signature"]
    assert rejection(lambda: verifier().verify(record, tiny_model(), 3)) == RejectReason.MALFORMED


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def test_dev_accounts_are_anvils_accounts():
    assert dev_account(0).address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert client_dev_account(0).address == dev_account(1).address
    assert client_dev_account(0).address == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    with pytest.raises(ValueError, match="partition_id"):
        client_dev_account(-1)


def test_keystore_loading_from_password_file_and_env(tmp_path, monkeypatch):
    account = Account.create()
    keystore = tmp_path / "key.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, "s3cret", iterations=2)))
    secret = tmp_path / "password.txt"
    secret.write_text("s3cret\n")
    assert load_keystore(keystore, password_file=secret).address == account.address
    monkeypatch.setenv(KEYSTORE_PASSWORD_ENV, "s3cret")
    assert load_keystore(keystore).address == account.address
    with pytest.raises(ValueError, match="cannot decrypt"):
        load_keystore(keystore, password="wrong")
    monkeypatch.delenv(KEYSTORE_PASSWORD_ENV)
    with pytest.raises(ValueError, match="no password"):
        load_keystore(keystore)
    with pytest.raises(FileNotFoundError):
        load_keystore(tmp_path / "missing.json", password="x")
