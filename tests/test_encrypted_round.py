"""The server's CKKS round against real ClientApps running the CKKS mod, in-process."""

from __future__ import annotations

import math

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

import bcsfl_flower.encrypted_round as encrypted_round
from bcsfl_flower.client.ckks_mod import (
    CKKS_CONFIG_KEY,
    GRAM_DIGEST_RECORD_KEY,
    GRAM_MESSAGE_TYPE,
    GRAM_RECORD_KEY,
    KEY_SEED_RUN_KEY,
    PUBLIC_RECORD_KEY,
    bcsfl_ckks_client_app,
    gram_digest,
    key_seed_bytes,
)
from bcsfl_flower.encrypted_round import (
    EncryptedReply,
    EncryptedReplyChecker,
    check_encrypted_reply,
    decrypt_gram_by_committee,
    encrypted_global,
    fetch_public_context,
    global_specs,
    screen_encrypted,
)
from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    EncryptedModel,
    decrypt_arrays,
    encrypt_arrays,
    to_array_record,
    weighted_mean,
)
from bcsfl_flower.privacy.ckks_keys import create_secret_context
from bcsfl_flower.privacy.encrypted_screening import encrypted_gram
from bcsfl_flower.replies import RejectedReply
from bcsfl_flower.screening import cosine_similarity_matrix, screen_updates

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


def honest_delta(node: int, server_round: int) -> dict[str, np.ndarray]:
    common = np.random.default_rng([server_round])
    own = np.random.default_rng([server_round, node])
    return {
        k: (0.02 * common.normal(size=v.shape) + 0.01 * own.normal(size=v.shape)).astype(v.dtype)
        for k, v in W0.items()
    }


def delta(node: int, server_round: int, attackers=()) -> dict[str, np.ndarray]:
    honest = honest_delta(node, server_round)
    if node in attackers:
        return {k: (-3.0 * v).astype(v.dtype) for k, v in honest.items()}
    return honest


def num_examples(node: int) -> int:
    return 10 * node


class Federation:
    """Real ``bcsfl_ckks_client_app`` ClientApps behind a Grid, one Context per node.

    ``silent`` nodes never answer; ``failing`` nodes answer with an error; ``liars``
    map a node to an offset it adds to every Gram matrix (with a matching digest).
    """

    def __init__(self, nodes=NODES, *, silent=(), failing=(), liars=None, attackers=()):
        self.app = bcsfl_ckks_client_app()
        self.app.train()(self._train)
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
        self.silent, self.failing = set(silent), set(failing)
        self.liars = dict(liars or {})
        self.attackers = set(attackers)
        self.sent: list[Message] = []
        self.app_saw_ciphertext = False

    def _train(self, msg: Message, ctx: Context) -> Message:
        received = msg.content["arrays"]
        self.app_saw_ciphertext |= ENCRYPTED_ARRAY_KEY in received
        step = delta(ctx.node_id, int(msg.content["config"]["server-round"]), self.attackers)
        trained = {k: Array(received[k].numpy() + step[k]) for k in received}
        content = RecordDict(
            {
                "arrays": ArrayRecord(trained),
                "metrics": MetricRecord({"num-examples": num_examples(ctx.node_id)}),
            }
        )
        return Message(content, reply_to=msg)

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
            if node in self.liars and message.metadata.message_type == GRAM_MESSAGE_TYPE:
                lie = reply.content[GRAM_RECORD_KEY]["gram"].numpy() + self.liars[node]
                reply.content[GRAM_RECORD_KEY] = ArrayRecord({"gram": Array(lie)})
                reply.content[GRAM_DIGEST_RECORD_KEY] = ConfigRecord({"sha256": gram_digest(lie)})
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


def flat(updates: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.stack(
        [np.concatenate([v.astype(np.float64).ravel() for v in u.values()]) for u in updates]
    )


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
        EncryptedReplyChecker(SPECS, secret)
    for name in ("decrypt_arrays", "decrypt_gram", "create_secret_context", "load_secret_context"):
        assert not hasattr(encrypted_round, name)


def test_fetch_public_context_fails_loudly(secret):
    with pytest.raises(RuntimeError, match="node 1 sent no CKKS public context"):
        fetch_public_context(Federation(silent={1}), node_id=1, timeout=1)
    with pytest.raises(RuntimeError, match="error reply"):
        fetch_public_context(Federation(failing={1}), node_id=1, timeout=1)

    class LeakyGrid(Federation):
        def send_and_receive(self, messages, *, timeout=None):
            data = secret.serialize(save_secret_key=True)
            record = ArrayRecord({"context": Array(np.frombuffer(data, dtype=np.uint8))})
            return [Message(RecordDict({PUBLIC_RECORD_KEY: record}), reply_to=messages[0])]

    with pytest.raises(RuntimeError, match="secret key"):
        fetch_public_context(LeakyGrid(), node_id=1, timeout=1)


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


def test_check_encrypted_reply_rejections(secret, public):
    good = encrypt_arrays(honest_delta(2, 1), secret)
    good_bytes = good.serialize()
    plaintext = ArrayRecord({k: Array(v) for k, v in W0.items()})
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

    cases = {
        "plaintext weights": (plaintext, "expected one encrypted array"),
        "a second array": (extra, "expected one encrypted array"),
        "float payload": (as_float, "must be a 1-D uint8 array"),
        "garbage": (_bytes_record(b"\x00" * 64), "does not deserialise"),
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


def test_reply_checker_splits_replies(secret, public):
    good = to_array_record(encrypt_arrays(honest_delta(1, 1), secret))
    replies = [
        train_reply(1, good, num_examples=10),
        train_reply(2, ArrayRecord({k: Array(v) for k, v in W0.items()})),
        train_reply(3, good, num_examples=0),
        train_reply(4, good, num_examples=float("nan")),
    ]
    accepted, rejected = EncryptedReplyChecker(SPECS, public).split(replies)
    assert [r.node_id for r in accepted] == [1]
    assert isinstance(accepted[0], EncryptedReply)
    assert accepted[0].num_examples == 10.0
    reasons = {r.node_id: r.reason for r in rejected}
    assert all(isinstance(r, RejectedReply) for r in rejected)
    assert "expected one encrypted array" in reasons[2]
    assert "finite number > 0" in reasons[3] and "finite number > 0" in reasons[4]


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
    assert [m.metadata.message_type for m in grid.sent] == [GRAM_MESSAGE_TYPE] * 3


def test_committee_of_six_tolerates_two_faults(enc_gram):
    grid = Federation(liars={5: 1.0}, silent={6})
    matrix, record = decrypt_gram_by_committee(grid, list(NODES), enc_gram, 10, server_round=1)
    assert matrix is not None
    assert record["quorum"] == 4
    assert record["problems"] == {"6": "no reply"}


@pytest.mark.parametrize(
    ("behaviour", "committee"),
    [
        ({"liars": {2: 1.0}, "silent": {3}}, [1, 2, 3]),
        ({"failing": {2, 3}}, [1, 2, 3]),
        ({"liars": {2: 1.0, 3: 2.0}}, [1, 2, 3]),
        ({"silent": {3, 4}}, [1, 2, 3, 4]),
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


# --------------------------------------------------------------------------------------
# Screening and the encrypted global model
# --------------------------------------------------------------------------------------


def test_screen_encrypted_matches_plaintext_cosines():
    rng = np.random.default_rng(3)
    updates = rng.normal(size=(6, 50))
    cosine, norms = screen_encrypted(updates @ updates.T)
    np.testing.assert_allclose(cosine, cosine_similarity_matrix(updates), atol=1e-12)
    np.testing.assert_allclose(norms, np.linalg.norm(updates, axis=1), rtol=1e-12)
    centred = updates - updates.mean(axis=0)
    cosine, _ = screen_encrypted(updates @ updates.T, centering="mean")
    np.testing.assert_allclose(cosine, cosine_similarity_matrix(centred), atol=1e-10)
    with pytest.raises(ValueError, match="centering"):
        screen_encrypted(updates @ updates.T, centering="median")


def test_encrypted_global_rejects_a_mismatched_plaintext_model(secret, public):
    update = encrypted_update(1, 1, secret, public)
    w0_float64 = {k: v.astype(np.float64) for k, v in W0.items()}
    with pytest.raises(ValueError, match="keys, shapes or dtypes"):
        encrypted_global(w0_float64, [update], [10])
    with pytest.raises(ValueError, match="at least one"):
        encrypted_global(W0, [], [])


def test_five_encrypted_rounds_track_plaintext_fedavg_and_screen_out_a_flipper(public, secret):
    """The whole CKKS round, five times: mod, checks, Gram, committee, screening, W_{t+1}."""
    grid = Federation(attackers={6})
    checker = EncryptedReplyChecker(SPECS, public)
    previous: EncryptedModel | dict[str, np.ndarray] = W0
    plain = {k: v.astype(np.float64) for k, v in W0.items()}
    levels = []
    for server_round in range(1, 6):
        arrays = (
            to_array_record(previous)
            if isinstance(previous, EncryptedModel)
            else ArrayRecord({k: Array(v) for k, v in previous.items()})
        )
        config = ConfigRecord({"server-round": server_round, CKKS_CONFIG_KEY: True})
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node,
                message_type="train",
            )
            for node in NODES
        ]
        accepted, rejected = checker.split(grid.send_and_receive(messages))
        assert rejected == [] and len(accepted) == len(NODES)

        gram, record = decrypt_gram_by_committee(
            grid,
            [1, 2, 3],
            encrypted_gram([r.model for r in accepted]),
            10,
            server_round=server_round,
        )
        assert gram is not None, record["reason"]
        cosine, _ = screen_encrypted(gram)
        screening = screen_updates(cosine, 0.0)
        sent = flat([delta(n, server_round, {6}) for n in NODES])
        plain_screening = screen_updates(cosine_similarity_matrix(sent), 0.0)
        assert [accepted[i].node_id for i in screening.trusted] == [1, 2, 3, 4, 5]
        assert list(screening.trusted) == list(plain_screening.trusted)

        trusted = [accepted[i] for i in screening.trusted]
        previous = encrypted_global(
            previous, [r.model for r in trusted], [r.num_examples for r in trusted]
        )
        total = sum(num_examples(r.node_id) for r in trusted)
        for key in plain:
            plain[key] += sum(
                num_examples(r.node_id)
                / total
                * delta(r.node_id, server_round)[key].astype(np.float64)
                for r in trusted
            )
        ciphertext = previous.chunks[0].ciphertext()[0]
        levels.append((ciphertext.coeff_modulus_size(), round(math.log2(ciphertext.scale), 6)))

        decrypted = decrypt_arrays(previous, secret)  # the test checks what the server built
        for key in plain:
            assert np.max(np.abs(decrypted[key] - plain[key])) < 1e-3, (server_round, key)

    assert not grid.app_saw_ciphertext
    assert len(set(levels)) == 1 and levels[0][0] >= 1, levels  # adding never drops a level
