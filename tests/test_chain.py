"""Backends, retries, resumption and the content-addressed model store."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from chain_fixtures import GENESIS, approval_for, certificate, clients, toy_model
from eth_account import Account
from flwr.app import Array, ArrayRecord
from web3.exceptions import TimeExhausted

from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.backends import ANVIL_STATE_FILE, JOURNAL_FILE, connect
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.errors import ChainRejectedError, ChainUnavailableError
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.chain.model_store import ModelIntegrityError, ModelStore
from bcsfl_flower.chain.retry import RetryPolicy
from bcsfl_flower.packets import model_hash


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again when the block ends


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# --------------------------------------------------------------------------------------
# Retries and resumption
# --------------------------------------------------------------------------------------


def test_retry_policy_backs_off_exponentially_up_to_a_cap():
    policy = RetryPolicy(attempts=6, base_delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_connecting_to_a_closed_port_fails_with_a_clear_error(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ChainUnavailableError, match=f"no Ethereum JSON-RPC answer at {url}"):
        connect(url, tmp_path, startup_timeout_s=0.3)


def test_anchoring_on_a_chain_that_went_down_retries_then_stops_resumably(tmp_path):
    miners = clients(5)
    state_dir = tmp_path / "chain"
    sleep = RecordingSleep()
    policy = RetryPolicy(attempts=4, base_delay_s=0.25)
    with connect("anvil", state_dir) as connection:
        trail = AuditTrail.open(connection, GENESIS, retry=policy, sleep=sleep)
        trail.register_clients({m.address: 1 for m in miners})
        first = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
        trail.anchor_round(first)
        state_root = b"\x02" * 32
        second = certificate(trail, approval_for(trail, 2, 2.0, miners, state_root), miners, miners)
        pid = connection.pid
        connection.close()  # the chain goes down (anvil dumps its state and exits)
        with pytest.raises(ChainUnavailableError) as raised:
            trail.anchor_round(second)
        assert sleep.delays == [0.25, 0.5, 1.0]
        # Reads in the round's path (the head a rollback keeps) are retried too.
        with pytest.raises(ChainUnavailableError, match="getLatestModel"):
            trail.head()
        assert sleep.delays == [0.25, 0.5, 1.0] * 2
    error = raised.value
    assert error.attempts == 4 and error.action == "anchorRound(2)"
    assert error.resume["round"] == 2
    assert error.resume["model_hash"] == "0x" + model_hash(toy_model(2.0)).hex()
    assert error.resume["state_root"] == "0x" + state_root.hex()
    assert len(error.resume["signatures"]) == 5
    assert AnchorCertificate.from_dict(error.resume) == second
    assert pid is not None and (state_dir / ANVIL_STATE_FILE).is_file()

    # restart: anvil reloads its state, the trail attaches and the round goes through
    with connect("anvil", state_dir) as connection:
        assert connection.pid != pid
        resumed = AuditTrail.open(connection, GENESIS)
        assert resumed.address == trail.address
        assert resumed.head() == (1, model_hash(toy_model(1.0)))
        resumed.anchor_round(AnchorCertificate.from_dict(error.resume))
        assert [r.round for r in resumed.anchored_rounds()] == [1, 2]
        assert resumed.anchored_rounds()[1].signatures == second.signatures
        assert resumed.anchored_rounds()[1].approval.state_root == state_root
        assert resumed.get_blockchain(1) == [
            (1, model_hash(toy_model(1.0))),
            (2, model_hash(toy_model(2.0))),
        ]


def test_a_lost_receipt_is_not_anchored_twice(tmp_path):
    miners = clients(3)
    with connect("embedded", tmp_path) as connection:
        trail = AuditTrail.open(connection, GENESIS, sleep=RecordingSleep())
        trail.register_clients({m.address: 1 for m in miners})
        cert = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
        real_send = connection.send
        calls = []

        def send_then_lose_the_receipt(transaction):
            calls.append(transaction)
            real_send(transaction)
            if len(calls) == 1:
                raise TimeExhausted("receipt lost")
            raise AssertionError("a second transaction was sent")

        connection.send = send_then_lose_the_receipt
        anchored = trail.anchor_round(cert)
    assert len(calls) == 1
    assert anchored.round == 1 and anchored.model_hash == model_hash(toy_model(1.0))
    assert trail.round_count() == 1


def test_a_round_is_reported_anchored_only_after_a_successful_receipt(tmp_path):
    miners = clients(3)
    sleep = RecordingSleep()
    with connect("embedded", tmp_path) as connection:
        trail = AuditTrail.open(connection, GENESIS, sleep=sleep)
        trail.register_clients({m.address: 1 for m in miners})
        cert = certificate(trail, approval_for(trail, 1, 1.0, miners), miners, miners)
        real_send = connection.send

        def failed_receipt(transaction):
            # above the intrinsic gas (~28k), below what the anchor uses (~52k): out of gas
            receipt = dict(real_send({**transaction, "gas": 40_000}))
            assert receipt["status"] == 0
            return receipt

        connection.send = failed_receipt
        with pytest.raises(ChainRejectedError, match="reverted"):
            trail.anchor_round(cert)
        assert trail.latest_round() == 0
        connection.send = real_send
        assert trail.anchor_round(cert).round == 1
    assert sleep.delays == []


def test_a_contract_revert_is_not_retried(tmp_path):
    miners = clients(3)
    sleep = RecordingSleep()
    with connect("embedded", tmp_path) as connection:
        trail = AuditTrail.open(connection, GENESIS, sleep=sleep)
        trail.register_clients({m.address: 1 for m in miners})
        wrong_round = certificate(trail, approval_for(trail, 2, 1.0, miners), miners, miners)
        with pytest.raises(ChainRejectedError) as raised:
            trail.anchor_round(wrong_round)
    assert raised.value.error_name == "UnexpectedRound"
    assert "UnexpectedRound(expected=1, got=2)" in str(raised.value)
    assert sleep.delays == []


# --------------------------------------------------------------------------------------
# Embedded journal
# --------------------------------------------------------------------------------------


def anchored_embedded_run(state_dir, rounds=2):
    miners = clients(3)
    with connect("embedded", state_dir) as connection:
        trail = AuditTrail.open(connection, GENESIS)
        trail.register_clients({m.address: 1 for m in miners})
        for r in range(1, rounds + 1):
            trail.anchor_round(
                certificate(trail, approval_for(trail, r, r, miners), miners, miners)
            )
        return trail.address


def test_embedded_journal_replays_into_the_same_trail(tmp_path):
    address = anchored_embedded_run(tmp_path)
    with connect("embedded", tmp_path, read_only=True) as connection:
        trail = AuditTrail.open(connection, GENESIS)
        assert trail.address == address
        assert trail.head() == (2, model_hash(toy_model(2.0)))
        assert [len(r.signers) for r in trail.anchored_rounds()] == [3, 3]
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 4  # deploy, register, two anchors: read-only appended nothing


def test_embedded_journal_that_was_edited_does_not_replay(tmp_path):
    anchored_embedded_run(tmp_path)
    journal = tmp_path / JOURNAL_FILE
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    raw = bytearray.fromhex(entries[-1]["raw"][2:])
    raw[-40] ^= 0x01  # corrupt the signature of the last anchor transaction
    entries[-1]["raw"] = "0x" + raw.hex()
    journal.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    with pytest.raises(ValueError, match=f"{JOURNAL_FILE}:4: replay diverged"):
        connect("embedded", tmp_path, read_only=True)


def test_open_refuses_a_state_dir_of_another_run(tmp_path):
    anchored_embedded_run(tmp_path, rounds=1)
    with (
        connect("embedded", tmp_path) as connection,
        pytest.raises(ValueError, match="another run"),
    ):
        AuditTrail.open(connection, model_hash(toy_model(42.0)))


def test_manifest_round_trip(tmp_path):
    anchored_embedded_run(tmp_path / "chain", rounds=1)
    with connect("embedded", tmp_path / "chain") as connection:
        trail = AuditTrail.open(connection, GENESIS)
        path = trail.write_manifest(tmp_path / "chain.json", tmp_path / "models")
    data = json.loads(path.read_text())
    assert data["journal"] == f"chain/{JOURNAL_FILE}" and data["models"] == "models"
    manifest = ChainManifest.load(path)
    assert manifest.genesis_hash == GENESIS
    connection, reopened = manifest.open()
    try:
        assert reopened.head() == (1, model_hash(toy_model(1.0)))
    finally:
        connection.close()
    del data["contract"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'contract'"):
        ChainManifest.load(path)


# --------------------------------------------------------------------------------------
# Model store
# --------------------------------------------------------------------------------------


def test_model_store_round_trip_by_hash(tmp_path):
    store = ModelStore(tmp_path / "models")
    model = {
        **toy_model(1.5),
        "layer/0.weight": np.arange(6, dtype=">f8").reshape(2, 3),
        "mask": np.array([True, False]),
    }
    record = ArrayRecord({key: Array(value) for key, value in model.items()})
    digest = store.save(record)
    assert digest == model_hash(model)
    assert store.save(model) == digest  # the same model is stored once
    assert store.hashes() == [digest.hex()]
    loaded = store.load(digest)
    assert sorted(loaded) == sorted(model)
    for key, value in model.items():
        assert np.array_equal(loaded[key], value) and loaded[key].dtype == value.dtype
    assert model_hash(loaded) == digest
    assert store.load("0x" + digest.hex()).keys() == loaded.keys()


def test_model_store_detects_a_flipped_byte(tmp_path):
    store = ModelStore(tmp_path)
    digest = store.save(toy_model(1.0))
    store.verify(digest)
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    payload = data.find(np.float32(1.0).tobytes())
    assert payload > 0
    data[payload] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        store.verify(digest)


def test_model_store_detects_a_file_under_the_wrong_name(tmp_path):
    store = ModelStore(tmp_path)
    digest = store.save(toy_model(1.0))
    other = model_hash(toy_model(2.0))
    store.path(digest).rename(store.path(other))
    with pytest.raises(ModelIntegrityError, match="the file was modified"):
        store.verify(other)
    with pytest.raises(FileNotFoundError):
        store.verify(digest)
    with pytest.raises(ValueError, match="not a model hash"):
        store.path("xyz")


@pytest.mark.parametrize("backend", ["embedded", "anvil"])
def test_a_simulation_can_sign_with_an_operator_key_of_its_own(tmp_path, backend):
    """A development chain funds a secret operator key, and a reader's replay agrees."""
    operator = Account.create()
    genesis = model_hash(toy_model(0.0))
    with connect(backend, tmp_path, operator=operator) as connection:
        trail = AuditTrail.open(connection, genesis)
        assert functions_owner(trail) == operator.address
        trail.register_clients({client_dev_account(0).address: 1})
        trail.write_manifest(tmp_path / "chain.json", tmp_path / "models")
    # a resumed run does not fund it twice, and its trail still attaches
    with connect(backend, tmp_path, operator=operator) as connection:
        assert AuditTrail.open(connection, genesis).client_count() == 1
    with connect(backend, tmp_path, read_only=True) as reader:
        manifest = ChainManifest.load(tmp_path / "chain.json")
        assert manifest.operator == operator.address
        assert AuditTrail.attach(reader, manifest.contract).client_count() == 1


def functions_owner(trail: AuditTrail) -> str:
    return trail.contract.functions.owner().call()
