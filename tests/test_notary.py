"""The strategy with a real (embedded) audit chain: mining, anchoring and rollbacks.

The grid is a fake that answers evaluate messages with a loss and routes the miners'
duty message to the real bcsfl mod's ``mine`` handler, signing with each simulated
client's development key; the chain, contract, certificates and model store are real.
"""

import dataclasses
import time

import numpy as np
import pytest
from flower_messages import FakeGrid, train_reply
from flwr.app import Array, ArrayRecord

from bcsfl_flower.approvals import REFUSAL_REASON
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.chain.certificates import quorum
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.packets import PACKET_RECORD_KEY, ModelPacket, model_hash
from bcsfl_flower.protocol import VERDICT_RECORD_KEY, MinerVerdict
from bcsfl_flower.round.checks import PacketCheck
from bcsfl_flower.round.conclusion import stated_rollback_reason
from bcsfl_flower.round.notary import RoundNotary
from bcsfl_flower.round.state import Certification
from bcsfl_flower.round.statement import DecisionSettings, RoundStatement, StatedPlan
from bcsfl_flower.strategy import BCSFL

DIM = 1000  # with far fewer parameters, screening splits honest noise
GLOBAL = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
TARGET = np.ones(DIM, np.float32)


class MiningGrid(FakeGrid):
    """Evaluate: squared distance to TARGET. Duties: the real mod, whose verdicts some
    miners leave out (``silent_miners``) or refuse (``refusing_miners``: no package is
    fresh enough for them)."""

    def __init__(self, partition_of, silent_miners=(), refusing_miners=()):
        super().__init__(
            lambda node, arrays: float(np.sum((arrays["w"].numpy() - TARGET) ** 2)),
            partition_of=partition_of,
        )
        self.silent_miners = set(silent_miners)
        self.refusing_miners = set(refusing_miners)

    def context(self, node):
        context = super().context(node)
        if node in self.refusing_miners:
            context.node_config["bcsfl-freshness-s"] = -1.0
        return context

    def duty_reply(self, message, answer):
        if message.metadata.dst_node_id in self.silent_miners and not answer.has_error():
            for key in [
                k for k in answer.content.config_records if k.startswith(VERDICT_RECORD_KEY)
            ]:
                del answer.content[key]
        return super().duty_reply(message, answer)


def statement(server_round: int) -> RoundStatement:
    """A bare statement of a round from GLOBAL whose one candidate, "mean", is GLOBAL."""
    settings = DecisionSettings(5, 5, 0.0, 3.0, 0.0, 1.0, "trusted-mean", "plain")
    start = "0x" + model_hash(GLOBAL).hex()
    plan = StatedPlan(names=("mean",), scored={"mean": start})
    return RoundStatement(server_round, start, settings, {}, plan=plan)


def signed_reply(node, partition, update, notary, server_round):
    reply = train_reply(node, {"w": update.astype(np.float32)}, num_examples=100)
    arrays = reply.content["arrays"]
    packet = ModelPacket(
        model_hash=model_hash(arrays),
        timestamp=int(time.time()),
        round=server_round,
        client=client_dev_account(partition).address,
    )
    signed = packet.sign(client_dev_account(partition), notary.trail.domain)
    reply.content[PACKET_RECORD_KEY] = signed.to_config_record()
    return reply


def federation(notary, server_round, signed=True):
    rng = np.random.default_rng(server_round)
    replies = []
    for node in range(1, 7):
        update = 0.5 * TARGET + rng.normal(scale=0.05, size=DIM)
        if signed:
            replies.append(signed_reply(node, node - 1, update, notary, server_round))
        else:
            replies.append(train_reply(node, {"w": update.astype(np.float32)}, num_examples=100))
    return replies


def run(strategy, grid, server_round, replies, arrays=GLOBAL):
    strategy._global_arrays, strategy._grid = arrays, grid
    records = []
    strategy.round_sink = lambda rnd, rec: records.append(rec)
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return new_arrays, records[0]


def test_miners_certify_and_every_round_is_anchored_or_rolled_back(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        partition_of = {node: node - 1 for node in range(1, 7)}
        strategy = BCSFL(notary=notary, num_miners=4)

        arrays, record = run(strategy, MiningGrid(partition_of), 1, federation(notary, 1))
        assert record["outcome"] == "commit"
        assert record["signed"] == ["1", "2", "3", "4", "5", "6"]
        assert record["model_hash"] == "0x" + model_hash(arrays).hex()
        assert len(record["committee"]["miners"]) == 4
        assert record["mining"] == {"certified_by": "miners", "refusals": {}}
        assert record["chain"]["anchored"] is True
        assert len(record["chain"]["signers"]) >= 3  # ceil(2*4/3) of 4 miners
        assert notary.trail.get_round(1) == model_hash(arrays)
        assert notary.store.path(model_hash(arrays)).is_file()

        # Round 2: every miner validates but leaves out its verdicts -> no certificate
        # -> rollback, recorded on chain.
        silent = MiningGrid(partition_of, silent_miners=set(range(1, 7)))
        kept, record = run(strategy, silent, 2, federation(notary, 2), arrays)
        assert record["outcome"] == "rollback"
        assert "quorum certificate failed (4 refused)" in record["reason"]
        assert record["mining"]["certified_by"] == "none"
        assert set(record["mining"]["refusals"]) == set(record["committee"]["miners"])
        assert all("no verdict on" in r for r in record["mining"]["refusals"].values())
        assert record["chain"]["anchored"] is False
        assert kept is arrays
        assert [r.round for r in notary.trail.rollbacks()] == [2]
        assert notary.trail.latest_round() == 2
    finally:
        notary.close()


def test_unsigned_replies_are_refused_unless_the_operator_admits_them(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path / "default", GLOBAL, num_simulated_clients=6)
    try:
        grid = MiningGrid({node: node - 1 for node in range(1, 7)})
        _, record = run(BCSFL(notary=notary), grid, 1, federation(notary, 1, signed=False))
        assert record["outcome"] == "rollback" and len(record["rejected"]) == 6
        assert all("require-signed" in reason for reason in record["rejected"].values())
    finally:
        notary.close()


def test_clients_without_the_mod_leave_the_operator_to_sign(tmp_path):
    notary = RoundNotary.open(
        "embedded", tmp_path, GLOBAL, num_simulated_clients=6, require_signed=False
    )
    try:
        strategy = BCSFL(notary=notary)
        grid = MiningGrid({node: node - 1 for node in range(1, 7)})
        arrays, record = run(strategy, grid, 1, federation(notary, 1, signed=False))
        assert record["signed"] == []
        assert record["chain"]["certified_by"] == "operator"
        assert record["chain"]["signers"] == [notary.connection.operator.address]
        assert notary.trail.get_round(1) == model_hash(arrays)
    finally:
        notary.close()


def test_a_forged_packet_is_rejected_and_the_round_goes_on(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        strategy = BCSFL(notary=notary)
        replies = federation(notary, 1)
        # Node 6 claims node 1's packet: the hash no longer matches its arrays.
        replies[5].content[PACKET_RECORD_KEY] = replies[0].content[PACKET_RECORD_KEY]
        grid = MiningGrid({node: node - 1 for node in range(1, 7)})
        _, record = run(strategy, grid, 1, replies)
        assert "packet rejected" in record["rejected"]["6"]
        assert record["outcome"] == "commit"
    finally:
        notary.close()


def test_two_nodes_signing_with_one_key_do_not_stop_mining(tmp_path):
    """A key seen on two node ids (a restarted SuperNode) is asked to sign only once."""
    notary = RoundNotary.open(  # node 1 sends one reply unsigned
        "embedded", tmp_path, GLOBAL, num_simulated_clients=6, require_signed=False
    )
    try:
        strategy = BCSFL(notary=notary, num_miners=7, num_validators=3)
        partition_of = {node: node - 1 for node in range(1, 7)} | {7: 0}
        arrays, record = run(strategy, MiningGrid(partition_of), 1, federation(notary, 1))
        assert record["outcome"] == "commit"
        # Round 2: node 7 signs with partition 0's key, node 1 (same key) sends unsigned.
        replies = federation(notary, 2)
        replies[0] = train_reply(1, replies[0].content["arrays"], num_examples=100)
        update = 0.5 * TARGET + np.random.default_rng(77).normal(scale=0.05, size=DIM)
        replies.append(signed_reply(7, 0, update, notary, 2))
        arrays, record = run(strategy, MiningGrid(partition_of), 2, replies, arrays)
        assert record["signed"] == ["2", "3", "4", "5", "6", "7"]
        assert record["trusted"] == ["1", "2", "3", "4", "5", "6", "7"]
        assert {"1", "7"} <= set(record["committee"]["miners"])
        assert record["outcome"] == "commit", record["reason"]
        assert record["mining"]["certified_by"] == "miners"
        signers = record["chain"]["signers"]
        (anchored,) = [r for r in notary.trail.anchored_rounds() if r.round == 2]
        assert len(anchored.committee) == 6  # six distinct keys among seven miners
        # the certificate keeps exactly the quorum, the lowest addresses that approved
        assert len(signers) == len(set(signers)) == quorum(6) == 4
        assert tuple(signers) == anchored.signers == anchored.committee[:4]
        assert notary.trail.get_round(2) == model_hash(arrays)
    finally:
        notary.close()


@pytest.mark.parametrize(
    ("refusing", "outcome"), [({1}, "commit"), ({1, 2, 3}, "rollback"), ({1, 2, 3, 4}, "rollback")]
)
def test_refusing_miners_are_recorded_and_count_against_the_quorum(tmp_path, refusing, outcome):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        strategy = BCSFL(notary=notary, num_miners=6)  # every client mines: quorum 4
        grid = MiningGrid({node: node - 1 for node in range(1, 7)}, refusing_miners=refusing)
        _, record = run(strategy, grid, 1, federation(notary, 1))
        assert record["trusted"] == ["1", "2", "3", "4", "5", "6"]
        assert sorted(record["committee"]["miners"]) == ["1", "2", "3", "4", "5", "6"]
        assert set(record["mining"]["refusals"]) == {str(node) for node in refusing}
        assert all("old" in reason for reason in record["mining"]["refusals"].values())
        assert record["outcome"] == outcome
        if outcome == "commit":
            # five approved; the certificate carries the quorum of six (4), not all five
            assert len(record["chain"]["signers"]) == quorum(6) == 4
            assert client_dev_account(0).address not in record["chain"]["signers"]
        else:
            assert f"quorum certificate failed ({len(refusing)} refused)" in record["reason"]
            assert [r.round for r in notary.trail.rollbacks()] == [1]
            assert_rollback_is_the_miners_word_only_with_a_quorum_of_refusals(
                notary, tmp_path, record, len(refusing) >= quorum(6)
            )
    finally:
        notary.close()


def assert_rollback_is_the_miners_word_only_with_a_quorum_of_refusals(
    notary, run_dir, record, quorum_refused
):
    """Refusing miners sign the rollback, with the reason that says so; a quorum of them
    certifies it, and verify accepts it. Fewer, and the operator certifies it alone:
    verify reports the round withheld."""
    (rollback,) = notary.trail.rollbacks()
    operator = notary.connection.operator.address
    assert record["chain"]["certified_by"] == ("miners" if quorum_refused else "operator")
    assert (list(rollback.committee) == [operator]) is not quorum_refused
    assert rollback.reason == REFUSAL_REASON
    report = verify_trail(notary.trail, ChainManifest.load(run_dir / "chain.json"))
    withheld = [f.message for f in report.failures if f.round == 1 and "withheld" in f.message]
    assert report.ok is quorum_refused, report.failures
    assert bool(withheld) is not quorum_refused


def test_check_packet_learns_addresses_and_refuses_a_node_that_changes_key(tmp_path):
    notary = RoundNotary.open(
        "embedded", tmp_path, GLOBAL, num_simulated_clients=6, require_signed=False
    )
    try:
        update = 0.5 * TARGET
        unsigned = train_reply(1, {"w": update}, num_examples=100)
        assert notary.check_packet(1, unsigned.content, 1) == PacketCheck()

        signed = signed_reply(1, 0, update, notary, 1)
        check = notary.check_packet(1, signed.content, 1)
        assert check.rejection is None
        assert check.packet.packet.client == client_dev_account(0).address
        assert notary.addresses == {"1": client_dev_account(0).address}

        replayed = notary.check_packet(2, signed.content, 1)
        assert replayed.packet is None and "packet rejected" in replayed.rejection

        other_key = signed_reply(1, 3, update, notary, 2)
        changed = notary.check_packet(1, other_key.content, 2)
        assert changed.packet is None
        assert f"node 1 signed as {client_dev_account(0).address} before" in changed.rejection
    finally:
        notary.close()


def test_an_address_bound_to_a_node_is_accepted_only_from_that_node(tmp_path):
    """SuperNode authentication fixes each node's id; the registry binds addresses to ids,
    so another node holding a stolen Ethereum key cannot sign as its owner."""
    owner = client_dev_account(0).address
    notary = RoundNotary.open(
        "embedded", tmp_path, GLOBAL, node_bindings={owner.lower(): 7}, require_signed=True
    )
    try:
        assert notary.trail.is_registered(owner)
        update = 0.5 * TARGET
        stolen = notary.check_packet(8, signed_reply(8, 0, update, notary, 1).content, 1)
        assert stolen.packet is None
        assert "binds to node 7: node 8 cannot sign as it" in stolen.rejection
        # the refused packet did not use up the owner's one packet of the round
        own = notary.check_packet(7, signed_reply(7, 0, update, notary, 1).content, 1)
        assert own.rejection is None and own.packet.packet.client == owner
    finally:
        notary.close()


def test_a_client_registry_is_a_list_or_binds_each_address_to_a_node_id(tmp_path):
    from bcsfl_vision.server_app import read_client_registry

    path = tmp_path / "registry.json"
    path.write_text('["0xA", "0xB"]')
    assert read_client_registry(path) == (["0xA", "0xB"], {})
    path.write_text('{"0xA": 3, "0xB": 9}')
    assert read_client_registry(path) == (["0xA", "0xB"], {"0xA": 3, "0xB": 9})
    for bad in ('{"0xA": "3"}', '{"0xA": 0}', '{"0xA": true}', '"0xA"', "[1]"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="client-registry"):
            read_client_registry(path)


def test_certification_is_frozen_and_anchoring_needs_a_certificate(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        refused = Certification(False, "none", {"3": "no reply"})
        with pytest.raises(dataclasses.FrozenInstanceError):
            refused.certified = True
        with pytest.raises(ValueError, match="without a certificate"):
            notary.anchor(GLOBAL, refused)
        # No miner has a known address: in a federation that admits only signed
        # clients, the operator may not certify the commit, only the rollback
        plan = notary.mining_plan(statement(1), "mean", GLOBAL, [], ["1", "2"])
        assert plan.signing == {}
        certification = notary.certify(plan, "mean", {})
        assert not certification.certified
        assert certification.refusals == {"operator": "the operator cannot certify"}
        rolled = notary.rollback(statement(1), certification)
        assert rolled["certified_by"] == "operator"
        assert rolled["signers"] == [notary.connection.operator.address]
        (recorded,) = notary.trail.rollbacks()
        assert recorded.round == 1
        # the reason on chain is the statement's own, whatever the pipeline logged
        assert recorded.reason == stated_rollback_reason(statement(1), notary.trail.domain)
    finally:
        notary.close()


def test_the_operator_certifies_commits_only_where_unsigned_clients_are_admitted(tmp_path):
    notary = RoundNotary.open(
        "embedded", tmp_path, GLOBAL, num_simulated_clients=6, require_signed=False
    )
    try:
        assert notary.trail.operator_certifies()
        plan = notary.mining_plan(statement(1), "mean", GLOBAL, [], ["1", "2"])
        certification = notary.certify(plan, "mean", {})
        assert certification.certified and certification.certified_by == "operator"
        assert certification.certificate.signers == (notary.connection.operator.address,)
        assert notary.anchor(GLOBAL, certification)["anchored"] is True
    finally:
        notary.close()


def test_require_signed_rejects_unsigned_and_unregistered_replies(tmp_path):
    notary = RoundNotary.open(
        "embedded", tmp_path, GLOBAL, num_simulated_clients=6, require_signed=True
    )
    try:
        strategy = BCSFL(notary=notary)
        grid = MiningGrid({node: node - 1 for node in range(1, 8)})
        replies = federation(notary, 1)
        unsigned = train_reply(7, {"w": (0.5 * TARGET).astype(np.float32)}, num_examples=100)
        # Partition 40's development key is valid but was never registered on the contract.
        stranger = signed_reply(8, 40, 0.5 * TARGET, notary, 1)
        arrays, record = run(strategy, grid, 1, [*replies, unsigned, stranger])
        assert record["outcome"] == "commit"
        assert "unsigned reply" in record["rejected"]["7"]
        assert "require-signed" in record["rejected"]["7"]
        assert "unregistered-signer" in record["rejected"]["8"]
        assert sorted(record["signed"]) == ["1", "2", "3", "4", "5", "6"]
        assert record["chain"]["certified_by"] == "miners"
    finally:
        notary.close()


def test_a_registered_clients_signed_garbage_is_rejected_as_malformed(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        *honest, last = federation(notary, 1)
        # Node 6 signs the hash of a real model, then sends bytes numpy cannot read.
        good = last.content["arrays"]["w"]
        garbage = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"\x93NUMPY?")
        last.content["arrays"] = ArrayRecord({"w": garbage})
        grid = MiningGrid({node: node - 1 for node in range(1, 7)})
        _, record = run(BCSFL(notary=notary), grid, 1, [*honest, last])
        assert record["outcome"] == "commit"
        assert "malformed" in record["rejected"]["6"]
        assert "not a readable .npy" in record["rejected"]["6"]
    finally:
        notary.close()


def test_a_miner_cannot_answer_for_another_miner(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        notary.addresses.update({str(n): client_dev_account(n - 1).address for n in (1, 2, 3)})
        stated = statement(1)
        plan = notary.mining_plan(stated, "mean", GLOBAL, [], ["1", "2", "3"])
        approval = plan.approvals["mean"]
        assert approval.state_root == stated.digest()
        signatures = {
            node: approval.sign(client_dev_account(int(node) - 1), notary.trail.domain)
            for node in plan.signing
        }
        honest = {node: MinerVerdict(plan.signing[node], signatures[node], None) for node in "12"}
        # node 3 passes node 1's approval off as its own answer
        replayed = MinerVerdict(plan.signing["1"], signatures["1"], None)
        certification = notary.certify(plan, "mean", {**honest, "3": replayed})
        assert f"answered as {plan.signing['1']}" in certification.refusals["3"]
        assert certification.certified  # 2 of 3 honest approvals are the quorum
        assert set(certification.certificate.signers) == {plan.signing["1"], plan.signing["2"]}
        # with only one honest approval left, the replay cannot make up the quorum
        alone = notary.certify(plan, "mean", {"1": honest["1"], "3": replayed})
        assert not alone.certified and alone.refusals["2"] == "no reply"
    finally:
        notary.close()
