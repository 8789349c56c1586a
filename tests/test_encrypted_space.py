"""The CKKS update space against real ClientApps running the CKKS mod, in-process.

The grid is a federation of real ``bcsfl_ckks_client_app`` ClientApps, one Context per
node, sharing the simulation key. The server side (``EncryptedSpace`` and the BCSFL
strategy with ``ckks=True``) holds only the public context it fetches from a client.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from flower_messages import train_reply
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

import bcsfl_flower.round.encrypted as encrypted_space
from bcsfl_flower.client.ckks_app import bcsfl_ckks_client_app
from bcsfl_flower.client.ckks_mod import KEY_SEED_RUN_KEY, key_seed_bytes
from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    EncryptedModel,
    decrypt_arrays,
    encrypt_arrays,
    from_array_record,
    to_array_record,
    weighted_mean,
)
from bcsfl_flower.privacy.ckks_keys import create_secret_context
from bcsfl_flower.privacy.encrypted_screening import encrypted_gram
from bcsfl_flower.protocol import (
    CKKS_CONFIG_KEY,
    GRAM_DIGEST_RECORD_KEY,
    GRAM_MESSAGE_TYPE,
    GRAM_RECORD_KEY,
    PUBLIC_MESSAGE_TYPE,
    PUBLIC_RECORD_KEY,
    ROUND_KEY,
    config_value,
    gram_digest,
    model_record,
)
from bcsfl_flower.round.checks import check_replies
from bcsfl_flower.round.encrypted import (
    EncryptedBatch,
    EncryptedCollector,
    EncryptedSpace,
    check_encrypted_reply,
    decrypt_gram_by_committee,
    encrypted_step,
    fetch_public_context,
    global_specs,
)
from bcsfl_flower.round.space import GramExchange, update_space
from bcsfl_flower.strategy import BCSFL

SEED = 11
NODES = (1, 2, 3, 4, 5, 6)


def initial_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "w": rng.normal(size=(60, 80)).astype(np.float32),  # 4800 + 16 values: 2 ciphertexts
        "b": rng.normal(size=16).astype(np.float32),
    }


W0 = initial_model()
SPECS = global_specs(ArrayRecord({k: Array(v) for k, v in W0.items()}))


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def common_step(server_round: int) -> dict[str, np.ndarray]:
    """The direction every honest client moves in, in one round."""
    common = np.random.default_rng([server_round])
    return {k: 0.02 * common.normal(size=v.shape) for k, v in W0.items()}


def honest_delta(node: int, server_round: int) -> dict[str, np.ndarray]:
    own = np.random.default_rng([server_round, node])
    return {
        k: (v + 0.01 * own.normal(size=v.shape)).astype(W0[k].dtype)
        for k, v in common_step(server_round).items()
    }


ATTACKS = {
    "flip": -1.0,  # as long as an honest update: only the direction test can see it
    "boost": 4.0,  # the right direction, four times too long: the length test
}


def delta(node: int, server_round: int, attackers=None) -> dict[str, np.ndarray]:
    honest = honest_delta(node, server_round)
    attack = (attackers or {}).get(node)
    if attack is None:
        return honest
    return {k: (ATTACKS[attack] * v).astype(v.dtype) for k, v in honest.items()}


def num_examples(node: int) -> int:
    return 10 * node


def target(server_round: int) -> dict[str, np.ndarray]:
    """Where the honest clients are heading after ``server_round`` rounds."""
    point = {k: v.astype(np.float64) for k, v in W0.items()}
    for past in range(1, server_round + 1):
        for key, value in common_step(past).items():
            point[key] += value
    return point


def flat(updates: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.stack(
        [np.concatenate([v.astype(np.float64).ravel() for v in u.values()]) for u in updates]
    )


class Federation:
    """Real ``bcsfl_ckks_client_app`` ClientApps behind a Grid, one Context per node.

    Train adds ``delta`` to the model received; evaluate reports the squared distance
    to :func:`target` of the message's round. ``silent`` nodes never answer;
    ``failing`` nodes answer with an error; ``liars`` map a node to an offset it adds
    to every Gram matrix (with a matching digest); ``corrupt`` nodes send a Gram
    matrix whose bytes cannot be decoded.
    """

    def __init__(
        self, nodes=NODES, *, silent=(), failing=(), liars=None, corrupt=(), attackers=None
    ):
        self.app = bcsfl_ckks_client_app()
        self.app.train()(self._train)
        self.app.evaluate()(self._evaluate)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node, "num-partitions": len(nodes)},
                state=RecordDict(),
                run_config={KEY_SEED_RUN_KEY: SEED},
            )
            for node in nodes
        }
        self.silent, self.failing, self.corrupt = set(silent), set(failing), set(corrupt)
        self.liars = dict(liars or {})
        self.attackers = dict(attackers or {})
        self.sent: list[Message] = []
        self.app_saw_ciphertext = False

    def _received(self, msg: Message) -> tuple[str, ArrayRecord, int]:
        name, received = model_record(msg.content)
        self.app_saw_ciphertext |= ENCRYPTED_ARRAY_KEY in received
        return name, received, int(config_value(msg.content, ROUND_KEY))

    def _train(self, msg: Message, ctx: Context) -> Message:
        name, received, server_round = self._received(msg)
        step = delta(ctx.node_id, server_round, self.attackers)
        trained = {k: Array(received[k].numpy() + step[k]) for k in received}
        content = RecordDict(
            {
                name: ArrayRecord(trained),
                "metrics": MetricRecord({"num-examples": num_examples(ctx.node_id)}),
            }
        )
        return Message(content, reply_to=msg)

    def _evaluate(self, msg: Message, ctx: Context) -> Message:
        _, received, server_round = self._received(msg)
        goal = target(server_round)
        loss = sum(float(np.sum((received[k].numpy() - goal[k]) ** 2)) for k in goal)
        metrics = MetricRecord({"eval_loss": loss, "num-examples": 10})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"ins-{len(self.sent)}-{number}"
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.failing:
                replies.append(Message(Error(code=1, reason="crashed"), reply_to=message))
                continue
            reply = self.app(message, self.contexts[node])
            if message.metadata.message_type == GRAM_MESSAGE_TYPE:
                if node in self.liars:
                    lie = reply.content[GRAM_RECORD_KEY]["gram"].numpy() + self.liars[node]
                    reply.content[GRAM_RECORD_KEY] = ArrayRecord({"gram": Array(lie)})
                    reply.content[GRAM_DIGEST_RECORD_KEY] = ConfigRecord(
                        {"sha256": gram_digest(lie)}
                    )
                if node in self.corrupt:
                    empty = Array(dtype="float64", shape=(3, 3), stype="numpy.ndarray", data=b"")
                    reply.content[GRAM_RECORD_KEY] = ArrayRecord({"gram": empty})
            replies.append(reply)
        return replies

    def get_node_ids(self):
        return list(self.contexts)


@pytest.fixture(scope="module")
def secret():
    return create_secret_context(seed=key_seed_bytes(SEED))


@pytest.fixture(scope="module")
def public():
    return fetch_public_context(Federation(), node_id=1, timeout=60)


def encrypted_update(node, server_round, secret, public) -> EncryptedModel:
    data = encrypt_arrays(honest_delta(node, server_round), secret).serialize()
    return EncryptedModel.deserialize(data, public)


def plain_gram(nodes):
    rows = flat([honest_delta(n, 1) for n in nodes])
    return rows @ rows.T


# --------------------------------------------------------------------------------------
# The server holds no secret key
# --------------------------------------------------------------------------------------


def test_the_fetched_context_is_public_and_cannot_decrypt(public, secret):
    assert not public.is_private()
    update = encrypted_update(1, 1, secret, public)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_arrays(update, public)


def test_server_functions_refuse_a_secret_context(secret):
    record = to_array_record(encrypt_arrays(honest_delta(1, 1), secret))
    with pytest.raises(ValueError, match="secret key"):
        check_encrypted_reply(record, SPECS, secret)
    with pytest.raises(ValueError, match="secret key"):
        EncryptedCollector(SPECS, secret)
    for name in ("decrypt_arrays", "decrypt_gram", "create_secret_context", "load_secret_context"):
        assert not hasattr(encrypted_space, name)


def test_fetch_public_context_fails_loudly(secret):
    with pytest.raises(RuntimeError, match="node 1 sent no CKKS public context"):
        fetch_public_context(Federation(silent={1}), node_id=1, timeout=1)
    with pytest.raises(RuntimeError, match="error reply"):
        fetch_public_context(Federation(failing={1}), node_id=1, timeout=1)

    class AnsweringGrid(Federation):
        def __init__(self, payload: Array):
            super().__init__()
            self.payload = payload

        def send_and_receive(self, messages, *, timeout=None):
            (message,) = messages
            assert message.metadata.message_type == PUBLIC_MESSAGE_TYPE
            record = ArrayRecord({"context": self.payload})
            return [Message(RecordDict({PUBLIC_RECORD_KEY: record}), reply_to=message)]

    leaked = np.frombuffer(secret.serialize(save_secret_key=True), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="secret key"):
        fetch_public_context(AnsweringGrid(Array(leaked)), node_id=1, timeout=1)
    garbage = Array(np.frombuffer(b"not a context" * 10, dtype=np.uint8))
    with pytest.raises(RuntimeError, match="not a serialised TenSEAL context"):
        fetch_public_context(AnsweringGrid(garbage), node_id=1, timeout=1)
    empty = Array(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b"")
    with pytest.raises(RuntimeError, match="cannot be decoded"):
        fetch_public_context(AnsweringGrid(empty), node_id=1, timeout=1)


# --------------------------------------------------------------------------------------
# Checking encrypted replies
# --------------------------------------------------------------------------------------


def test_check_encrypted_reply_accepts_a_client_update(secret, public):
    record = to_array_record(encrypt_arrays(honest_delta(2, 1), secret))
    model = check_encrypted_reply(record, SPECS, public)
    assert isinstance(model, EncryptedModel)
    assert model.specs == SPECS


def _bytes_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({ENCRYPTED_ARRAY_KEY: Array(np.frombuffer(data, dtype=np.uint8))})


def _header_only(header: dict) -> bytes:
    """An encrypted-model payload with the given JSON header and no ciphertext."""
    text = json.dumps(header).encode()
    return b"BCSFL-CKKS-MODEL\x01" + struct.pack(">I", len(text)) + text


def test_check_encrypted_reply_rejections(secret, public):
    good = encrypt_arrays(honest_delta(2, 1), secret)
    good_bytes = good.serialize()
    plaintext = record_of(W0)
    extra = ArrayRecord(
        {ENCRYPTED_ARRAY_KEY: Array(np.frombuffer(good_bytes, dtype=np.uint8)), "x": Array(W0["b"])}
    )
    as_float = ArrayRecord({ENCRYPTED_ARRAY_KEY: Array(np.zeros(4, dtype=np.float32))})
    other_shapes = {"w": np.zeros((80, 60), np.float32), "b": np.zeros(16, np.float32)}
    # one ciphertext too many: same specs, the header claims 3 chunks and a third follows
    chunk = good.chunks[0].serialize()
    tampered = good_bytes.replace(b'"chunks":2', b'"chunks":3') + len(chunk).to_bytes(8, "big")
    tampered += chunk
    aggregate = weighted_mean([EncryptedModel.deserialize(good_bytes, public)] * 2, [1, 1])
    no_bytes = ArrayRecord(
        {ENCRYPTED_ARRAY_KEY: Array(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b"")}
    )
    zero_slots = _header_only({"arrays": [["w", "float32", [5]]], "chunks": 0, "slots": 0})

    cases = {
        "plaintext weights": (plaintext, "expected one encrypted array"),
        "a second array": (extra, "expected one encrypted array"),
        "float payload": (as_float, "must be a 1-D uint8 array"),
        "garbage": (_bytes_record(b"\x00" * 64), "does not deserialise"),
        "no bytes at all": (no_bytes, "does not deserialise"),
        "zero slots": (_bytes_record(zero_slots), "does not deserialise"),
        "other specs": (
            to_array_record(encrypt_arrays(other_shapes, secret)),
            "keys, shapes or dtypes differ",
        ),
        "extra ciphertext": (_bytes_record(tampered), "need 2 ciphertexts, got 3"),
        "not fresh": (to_array_record(aggregate), "is not fresh"),
    }
    for name, (record, reason) in cases.items():
        outcome = check_encrypted_reply(record, SPECS, public)
        assert isinstance(outcome, str), name
        assert reason in outcome, (name, outcome)


def test_collector_checks_replies_in_the_check_stage(secret, public):
    good = to_array_record(encrypt_arrays(honest_delta(1, 1), secret))
    other = to_array_record(encrypt_arrays(honest_delta(5, 1), secret))
    replies = [
        train_reply(1, good, num_examples=10),
        train_reply(2, record_of(W0)),
        train_reply(3, good, num_examples=0),
        train_reply(4, good, num_examples=float("nan")),
        train_reply(5, other, num_examples=50),
        train_reply(1, other, num_examples=10),  # a second reply of node 1 is ignored
    ]
    checked = check_replies(replies, EncryptedCollector(SPECS, public), "num-examples", 1)
    assert checked.names == ("1", "5")
    assert [c.num_examples for c in checked.accepted] == [10.0, 50.0]
    assert isinstance(checked.batch, EncryptedBatch) and checked.batch.size == 2
    decrypted = decrypt_arrays(checked.batch.models[1], secret)  # rows follow the replies
    np.testing.assert_allclose(decrypted["w"], honest_delta(5, 1)["w"], atol=1e-5)
    assert "expected one encrypted array" in checked.rejected["2"]
    assert "finite number > 0" in checked.rejected["3"]
    assert "finite number > 0" in checked.rejected["4"]


# --------------------------------------------------------------------------------------
# Committee decryption of the Gram matrix
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enc_gram(secret, public):
    return encrypted_gram([encrypted_update(n, 1, secret, public) for n in (1, 2, 3)])


def test_committee_accepts_the_matrix_two_thirds_return(enc_gram):
    grid = Federation(liars={3: 0.5})
    matrix, record = decrypt_gram_by_committee(grid, [1, 2, 3], enc_gram, 10, server_round=1)
    expected = plain_gram((1, 2, 3))
    assert matrix is not None
    assert np.max(np.abs(matrix - expected)) < 1e-4 * np.max(expected)
    assert record["quorum"] == 2
    assert record["answers"]["1"] == record["answers"]["2"] == record["digest"]
    assert record["answers"]["3"] != record["digest"]
    assert "2/3 members returned the same Gram matrix" in record["reason"]
    assert [m.metadata.message_type for m in grid.sent] == [GRAM_MESSAGE_TYPE] * 3
    json.dumps(record)  # goes into the round record as it is


def test_committee_of_six_tolerates_two_faults(enc_gram):
    grid = Federation(liars={5: 1.0}, silent={6})
    matrix, record = decrypt_gram_by_committee(grid, list(NODES), enc_gram, 10, server_round=1)
    assert matrix is not None
    assert record["quorum"] == 4
    assert record["problems"] == {"6": "no reply"}


def test_an_undecodable_answer_is_a_problem_not_a_crash(enc_gram):
    grid = Federation(corrupt={2})
    matrix, record = decrypt_gram_by_committee(grid, [1, 2, 3, 4], enc_gram, 10, server_round=1)
    assert matrix is not None  # three of four agree: quorum 3
    assert "cannot be decoded" in record["problems"]["2"]


@pytest.mark.parametrize(
    ("behaviour", "committee"),
    [
        ({"liars": {2: 1.0}, "silent": {3}}, [1, 2, 3]),
        ({"failing": {2, 3}}, [1, 2, 3]),
        ({"liars": {2: 1.0, 3: 2.0}}, [1, 2, 3]),
        ({"silent": {3, 4}}, [1, 2, 3, 4]),
        ({"corrupt": {1, 2}}, [1, 2, 3]),
    ],
)
def test_committee_rejects_without_a_quorum(enc_gram, behaviour, committee):
    matrix, record = decrypt_gram_by_committee(
        Federation(**behaviour), committee, enc_gram, 10, server_round=1
    )
    assert matrix is None
    assert record["digest"] is None
    assert "no Gram matrix reached quorum" in record["reason"]
    assert set(record["answers"]) | set(record["problems"]) == {str(n) for n in committee}


def test_committee_arguments_are_checked(enc_gram):
    with pytest.raises(ValueError, match="empty"):
        decrypt_gram_by_committee(Federation(), [], enc_gram, 10, server_round=1)
    with pytest.raises(ValueError, match="duplicates"):
        decrypt_gram_by_committee(Federation(), [1, 1, 2], enc_gram, 10, server_round=1)
    with pytest.raises(TypeError, match="EncryptedGram"):
        decrypt_gram_by_committee(Federation(), [1, 2], enc_gram.serialize(), 10, server_round=1)


# --------------------------------------------------------------------------------------
# Candidates on ciphertexts
# --------------------------------------------------------------------------------------


def test_encrypted_step_takes_arbitrary_coefficients(secret, public):
    updates = [encrypted_update(n, 1, secret, public) for n in (1, 2, 3)]
    plain = [honest_delta(n, 1) for n in (1, 2, 3)]
    coefficients = [0.7, 0.0, -0.45]  # not a mean: negative, zero, not summing to one
    step = encrypted_step(W0, updates, coefficients)
    stepped_again = encrypted_step(step, updates, [0.25, 0.25, 0.5])
    for model, rounds in (
        (step, [coefficients]),
        (stepped_again, [coefficients, [0.25] * 2 + [0.5]]),
    ):
        decrypted = decrypt_arrays(model, secret)
        for key, value in W0.items():
            expected = value.astype(np.float64)
            for row in rounds:
                expected = expected + sum(a * u[key] for a, u in zip(row, plain, strict=True))
            assert decrypted[key].dtype == value.dtype
            assert np.max(np.abs(decrypted[key] - expected)) < 1e-4, key


def test_encrypted_step_refuses_what_it_cannot_compute(secret, public):
    update = encrypted_update(1, 1, secret, public)
    w0_float64 = {k: v.astype(np.float64) for k, v in W0.items()}
    with pytest.raises(ValueError, match="keys, shapes or dtypes"):
        encrypted_step(w0_float64, [update], [0.5])
    with pytest.raises(ValueError, match="at least one"):
        encrypted_step(W0, [], [])
    with pytest.raises(ValueError, match="all weights are 0"):
        encrypted_step(W0, [update], [0.0])


def test_global_specs_follow_the_record_order():
    specs = global_specs(ArrayRecord({"b": Array(W0["b"]), "w": Array(W0["w"])}))
    assert [s.key for s in specs] == ["b", "w"]
    assert global_specs(W0) == SPECS
    with pytest.raises(TypeError, match="ArrayRecord or a mapping"):
        global_specs([W0["w"]])


# --------------------------------------------------------------------------------------
# EncryptedSpace: the UpdateSpace the pipeline uses
# --------------------------------------------------------------------------------------


def test_the_space_is_registered_and_prepares_once(secret, public):
    space = update_space("ckks")
    assert isinstance(space, EncryptedSpace)
    assert space.name == "ckks"
    assert space.message_config() == {CKKS_CONFIG_KEY: True}
    with pytest.raises(RuntimeError, match="prepare"):
        space.collector(record_of(W0), 6)

    grid = Federation()
    space.prepare(grid, record_of(W0), timeout=10)
    assert not space.public_ctx.is_private()
    assert space.specs == SPECS
    assert [m.metadata.dst_node_id for m in grid.sent] == [1]  # the lowest node id
    space.prepare(grid, record_of(W0), timeout=10)
    assert len(grid.sent) == 1  # fetched once

    # A resumed run starts from its last (encrypted) anchored model: same layout.
    resumed = EncryptedSpace()
    resumed.prepare(grid, to_array_record(encrypted_update(1, 1, secret, public)), timeout=10)
    assert resumed.specs == SPECS
    with pytest.raises(RuntimeError, match="no node"):
        EncryptedSpace().prepare(Federation(nodes=()), record_of(W0), timeout=10)


def test_the_space_computes_the_gram_and_every_candidate(secret):
    space = EncryptedSpace()
    grid = Federation()
    space.prepare(grid, record_of(W0), timeout=10)
    nodes = (2, 4, 5)
    collector = space.collector(record_of(W0), len(nodes))
    for node in nodes:
        update = to_array_record(encrypt_arrays(honest_delta(node, 1), secret))
        assert collector.add(update) is None
    batch = collector.finish()
    assert batch.size == 3

    drawn = []

    def draw_keyholders():
        drawn.append(True)
        return ("1", "3", "6")

    gram = space.gram(batch, GramExchange(grid, 1, draw_keyholders, 10.0))
    assert drawn == [True]
    expected = plain_gram(nodes)
    assert np.max(np.abs(gram.matrix - expected)) < 1e-4 * np.max(expected)
    assert gram.record["committee"] == ["1", "3", "6"] and gram.record["quorum"] == 2
    assert gram.reason == gram.record["reason"]
    asked = [m.metadata.dst_node_id for m in grid.sent[1:]]
    assert asked == [1, 3, 6]

    coefficients = np.array([[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0], [0.5, -0.25, 0.0]])
    candidates = space.combine(record_of(W0), batch, coefficients)
    assert len(candidates) == 3
    plain = [honest_delta(n, 1) for n in nodes]
    for row, candidate in zip(coefficients, candidates, strict=True):
        decrypted = decrypt_arrays(from_array_record(candidate, space.public_ctx), secret)
        for key, value in W0.items():
            expected = value + sum(a * u[key] for a, u in zip(row, plain, strict=True))
            assert np.max(np.abs(decrypted[key] - expected)) < 1e-4, key
    # The next round starts from an encrypted W_t: candidates add to its ciphertexts.
    (again,) = space.combine(candidates[0], batch, coefficients[1])
    decrypted = decrypt_arrays(from_array_record(again, space.public_ctx), secret)
    expected = W0["w"] + sum(u["w"] for u in plain) / 3 + plain[1]["w"]
    assert np.max(np.abs(decrypted["w"] - expected)) < 1e-4


def test_the_space_reports_a_gram_without_quorum(secret):
    space = EncryptedSpace()
    grid = Federation(silent={3, 6})
    space.prepare(grid, record_of(W0), timeout=10)
    collector = space.collector(record_of(W0), 2)
    for node in (1, 2):
        collector.add(to_array_record(encrypt_arrays(honest_delta(node, 1), secret)))
    gram = space.gram(collector.finish(), GramExchange(grid, 1, lambda: ("1", "3", "6"), 1.0))
    assert gram.matrix is None
    assert "no Gram matrix reached quorum 2 of 3" in gram.reason
    assert gram.record["problems"] == {"3": "no reply", "6": "no reply"}


# --------------------------------------------------------------------------------------
# End to end: BCSFL(ckks=True) against the same federation as the plaintext strategy
# --------------------------------------------------------------------------------------


def run_rounds(strategy, grid, rounds):
    """Run rounds through the strategy's Flower hooks; return the arrays and the records."""
    arrays = record_of(W0)
    records, models = [], []
    strategy.round_sink = lambda server_round, record: records.append(record)
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        messages.sort(key=lambda m: m.metadata.dst_node_id)  # FedAvg samples in random order
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        models.append(arrays)
    return models, records


def decrypted_model(arrays: ArrayRecord, secret) -> dict[str, np.ndarray]:
    return decrypt_arrays(from_array_record(arrays, secret), secret)


def plain_model(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize(
    ("attack", "reason"), [("flip", "outside the stake-majority cluster"), ("boost", "above 2.50x")]
)
def test_screening_rejects_a_planted_attacker_exactly_as_in_plaintext(secret, attack, reason):
    attackers = {6: attack}
    encrypted_grid = Federation(attackers=attackers)
    (encrypted,), (record,) = run_rounds(BCSFL(ckks=True), encrypted_grid, 1)
    (plain,), (plain_record,) = run_rounds(BCSFL(), Federation(attackers=attackers), 1)

    assert plain_record["trusted"] == ["1", "2", "3", "4", "5"]
    assert set(plain_record["rejected"]) == {"6"}
    assert reason in plain_record["rejected"]["6"]
    assert record["trusted"] == plain_record["trusted"]
    assert {n: r.split(":")[0] for n, r in record["rejected"].items()} == {
        n: r.split(":")[0] for n, r in plain_record["rejected"].items()
    }
    assert record["outcome"] == plain_record["outcome"] == "commit"
    assert record["candidate"] == plain_record["candidate"]
    assert record["slashed"] == plain_record["slashed"] == ["6"]
    assert record["stakes"] == plain_record["stakes"]

    # What the CKKS round adds: the key holders' answers; the server never saw plaintext.
    assert "gram" not in plain_record
    gram = record["gram"]
    assert len(gram["committee"]) == 5 and gram["quorum"] == 4
    assert gram["digest"] is not None and gram["problems"] == {}
    assert set(gram["answers"].values()) == {gram["digest"]}
    assert not encrypted_grid.app_saw_ciphertext
    assert list(encrypted.keys()) == [ENCRYPTED_ARRAY_KEY]
    decrypted, expected = decrypted_model(encrypted, secret), plain_model(plain)
    for key in W0:
        assert np.max(np.abs(decrypted[key] - expected[key])) < 1e-4, key


def test_encrypted_rounds_track_the_plaintext_rounds(secret):
    """Three CKKS rounds with a flipper, under non-default record names, follow plaintext."""
    # Every client validates: the committee is drawn with the previous model's hash, a
    # ciphertext's in one run and a plaintext's in the other, and the set-apart flipper
    # can be drawn; with all six on the committee both runs ask the same validators.
    names = {"arrayrecord_key": "weights", "configrecord_key": "fit-config", "num_validators": 6}
    attackers = {6: "flip"}
    encrypted_grid = Federation(attackers=attackers)
    encrypted, records = run_rounds(BCSFL(ckks=True, **names), encrypted_grid, 3)
    plain, plain_records = run_rounds(BCSFL(**names), Federation(attackers=attackers), 3)

    train = [m for m in encrypted_grid.sent if m.metadata.message_type == "train"]
    assert {tuple(m.content.keys()) for m in train} == {("weights", "fit-config")}
    assert all(m.content["fit-config"][CKKS_CONFIG_KEY] is True for m in train)
    levels = []
    for server_round, (record, plain_record) in enumerate(
        zip(records, plain_records, strict=True), 1
    ):
        assert record["outcome"] == plain_record["outcome"] == "commit", record["reason"]
        assert record["trusted"] == plain_record["trusted"] == ["1", "2", "3", "4", "5"]
        assert record["candidate"] == plain_record["candidate"]
        assert record["votes_for"] == plain_record["votes_for"]
        assert record["stakes"] == plain_record["stakes"]
        assert record["gram"]["digest"] is not None and "gram" not in plain_record
        model = from_array_record(encrypted[server_round - 1], secret)
        ciphertext = model.chunks[0].ciphertext()[0]
        levels.append((ciphertext.coeff_modulus_size(), round(math.log2(ciphertext.scale), 6)))
        decrypted = decrypt_arrays(model, secret)
        expected = plain_model(plain[server_round - 1])
        for key in W0:
            assert np.max(np.abs(decrypted[key] - expected[key])) < 1e-3, (server_round, key)
    # the models moved towards the honest clients' target
    goal = target(3)
    before = sum(float(np.sum((W0[k] - goal[k]) ** 2)) for k in W0)
    after = sum(float(np.sum((decrypted[k] - goal[k]) ** 2)) for k in W0)
    assert after < 0.2 * before
    assert not encrypted_grid.app_saw_ciphertext
    assert len(set(levels)) == 1 and levels[0][0] >= 1, levels  # adding never drops a level
