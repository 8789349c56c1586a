"""The strategy with a real (embedded) audit chain: mining, anchoring and rollbacks.

The grid is a fake that answers evaluate messages with a loss and routes the miners'
duty message to the real bcsfl mod's ``mine`` handler, signing with each simulated
client's development key; the chain, contract, certificates and model store are real.
"""

import time

import numpy as np
from flower_messages import FakeGrid, reply_to, train_reply
from flwr.app import Array, ArrayRecord, Context, RecordDict

from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.client.mod import MINE_MESSAGE_TYPE, mine
from bcsfl_flower.notary import RoundNotary
from bcsfl_flower.packets import PACKET_RECORD_KEY, ModelPacket, model_hash
from bcsfl_flower.strategy import BCSFL

DIM = 50
GLOBAL = ArrayRecord({"w": Array(np.zeros(DIM, np.float32))})
TARGET = np.ones(DIM, np.float32)


class MiningGrid(FakeGrid):
    """Evaluate: squared distance to TARGET. Mining: the real mod, unless silent."""

    def __init__(self, partition_of, silent_miners=()):
        super().__init__(lambda node, arrays: float(np.sum((arrays["w"].numpy() - TARGET) ** 2)))
        self.partition_of = partition_of
        self.silent_miners = set(silent_miners)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        mining = [m for m in messages if m.metadata.message_type == MINE_MESSAGE_TYPE]
        replies = super().send_and_receive(
            [m for m in messages if m not in mining], timeout=timeout
        )
        for number, message in enumerate(mining):
            message.metadata.__dict__["_message_id"] = f"mine-{number}"
            node = message.metadata.dst_node_id
            if node in self.silent_miners:
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.partition_of[node]},
                state=RecordDict(),
                run_config={},
            )
            answer = mine(message, context)
            replies.append(reply_to(message, answer.content))
        return replies


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
        strategy = BCSFL(notary=notary, screening_centering="none", num_miners=4)

        arrays, record = run(strategy, MiningGrid(partition_of), 1, federation(notary, 1))
        assert record["outcome"] == "commit"
        assert record["mining"]["certified_by"] == "miners"
        assert record["chain"]["anchored"] is True
        assert len(record["chain"]["signers"]) >= 3  # ceil(2*4/3) of 4 miners
        assert notary.trail.get_round(1) == model_hash(arrays)
        assert notary.store.path(model_hash(arrays)).is_file()

        # Round 2: all miners silent -> no certificate -> rollback, recorded on chain.
        silent = MiningGrid(partition_of, silent_miners=set(range(1, 7)))
        kept, record = run(strategy, silent, 2, federation(notary, 2), arrays)
        assert record["outcome"] == "rollback"
        assert "quorum certificate failed" in record["reason"]
        assert kept is arrays
        assert [r.round for r in notary.trail.rollbacks()] == [2]
        assert notary.trail.latest_round() == 2
    finally:
        notary.close()


def test_clients_without_the_mod_leave_the_operator_to_sign(tmp_path):
    notary = RoundNotary.open("embedded", tmp_path, GLOBAL, num_simulated_clients=6)
    try:
        strategy = BCSFL(notary=notary, screening_centering="none")
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
        strategy = BCSFL(notary=notary, screening_centering="none")
        replies = federation(notary, 1)
        # Node 6 claims node 1's packet: the hash no longer matches its arrays.
        replies[5].content[PACKET_RECORD_KEY] = replies[0].content[PACKET_RECORD_KEY]
        grid = MiningGrid({node: node - 1 for node in range(1, 7)})
        _, record = run(strategy, grid, 1, replies)
        assert "packet rejected" in record["rejected"]["6"]
        assert record["outcome"] == "commit"
    finally:
        notary.close()
