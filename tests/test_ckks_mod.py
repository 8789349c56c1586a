"""The CKKS client mod with real TenSEAL and real Flower Messages."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.client.ckks_app import bcsfl_ckks_client_app
from bcsfl_flower.client.ckks_mod import (
    KEY_SEED_RUN_KEY,
    SECRET_CONTEXT_NODE_KEY,
    ckks_gram,
    ckks_mod,
    key_seed_bytes,
    node_secret_context,
)
from bcsfl_flower.packets import PACKET_RECORD_KEY, Eip712Domain, PacketVerifier, model_hash
from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    EncryptedModel,
    add_plain,
    array_specs,
    decrypt_arrays,
    encrypt_arrays,
    from_array_record,
    is_encrypted_record,
    to_array_record,
    weighted_mean,
)
from bcsfl_flower.privacy.ckks_keys import (
    create_secret_context,
    load_public_context,
    public_context,
    save_secret_context,
)
from bcsfl_flower.privacy.encrypted_screening import EncryptedGram, encrypted_gram
from bcsfl_flower.protocol import (
    CKKS_CONFIG_KEY,
    GRAM_DIGEST_RECORD_KEY,
    GRAM_MESSAGE_TYPE,
    GRAM_REQUEST_RECORD_KEY,
    PUBLIC_MESSAGE_TYPE,
    gram_digest,
    gram_request,
    read_gram_reply,
    read_public_context,
    signing_config,
    validation_requests,
)

SEED = 7
DOMAIN = Eip712Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", bytes(range(32)))
RNG_SEED = 20240611


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 500)).astype(np.float32),  # 2 ciphertexts in all
        "fc.bias": rng.normal(size=10).astype(np.float32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }


def delta_of(node_id: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([RNG_SEED, node_id])
    model = global_model()
    delta = {k: (0.05 * rng.normal(size=v.shape)).astype(v.dtype) for k, v in model.items()}
    delta["bn.num_batches_tracked"] = np.array(5, dtype=np.int64)
    return delta


def record_of(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def node_context(node_id: int = 1, *, seed: int | None = SEED, **node_config) -> Context:
    run_config = {} if seed is None else {KEY_SEED_RUN_KEY: seed}
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": node_id, "num-partitions": 5, **node_config},
        state=RecordDict(),
        run_config=run_config,
    )


@pytest.fixture(scope="module")
def secret():
    return create_secret_context(seed=key_seed_bytes(SEED))


@pytest.fixture(scope="module")
def public(secret):
    return load_public_context(public_context(secret))


def message(kind: str, arrays: ArrayRecord, *, ckks: bool = True, **config) -> Message:
    values = {"server-round": 2, **config}
    if ckks:
        values[CKKS_CONFIG_KEY] = True
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(values)})
    return Message(content, dst_node_id=1, message_type=kind)


class ToyApp:
    """Train adds the node's delta to what it receives; evaluate reports a checksum."""

    def __init__(self):
        self.seen: list[ArrayRecord] = []

    def train(self, msg: Message, ctx: Context) -> Message:
        received = msg.content["arrays"]
        self.seen.append(received)
        delta = delta_of(ctx.node_id)
        trained = {k: received[k].numpy() + delta[k] for k in received}
        content = RecordDict(
            {"arrays": record_of(trained), "metrics": MetricRecord({"num-examples": 30})}
        )
        return Message(content, reply_to=msg)

    def evaluate(self, msg: Message, ctx: Context) -> Message:
        received = msg.content["arrays"]
        self.seen.append(received)
        total = float(sum(np.sum(received[k].numpy()) for k in received))
        return Message(RecordDict({"metrics": MetricRecord({"sum": total})}), reply_to=msg)


def encrypted_global_record(secret, public) -> ArrayRecord:
    """A realistic W_t: the server's ``w_0 + weighted mean`` of two encrypted updates."""
    updates = [
        EncryptedModel.deserialize(encrypt_arrays(delta_of(n), secret).serialize(), public)
        for n in (11, 12)
    ]
    return to_array_record(add_plain(weighted_mean(updates, [1, 3]), global_model()))


def expected_global() -> dict[str, np.ndarray]:
    w0, d11, d12 = global_model(), delta_of(11), delta_of(12)
    return {k: w0[k] + 0.25 * d11[k].astype(np.float64) + 0.75 * d12[k] for k in w0}


# --------------------------------------------------------------------------------------
# Train and evaluate
# --------------------------------------------------------------------------------------


def test_train_decrypts_the_global_model_and_sends_the_encrypted_update(secret, public):
    app = ToyApp()
    incoming = encrypted_global_record(secret, public)
    reply = ckks_mod(message("train", incoming), node_context(1), app.train)

    seen = app.seen[0]
    assert not is_encrypted_record(seen)
    assert array_specs({k: seen[k].numpy() for k in seen}) == array_specs(global_model())
    w_t = {k: seen[k].numpy() for k in seen}
    for key, value in expected_global().items():
        assert np.max(np.abs(w_t[key] - value)) < 1e-3, key

    sent = reply.content["arrays"]
    assert is_encrypted_record(sent)
    update = from_array_record(sent, public)  # the server deserialises with its public context
    assert update.specs == array_specs(global_model())
    decrypted = decrypt_arrays(update, secret)
    for key, value in delta_of(1).items():
        assert np.max(np.abs(decrypted[key].astype(np.float64) - value)) < 1e-3, key
    assert reply.content["metrics"]["num-examples"] == 30


def test_train_in_round_one_encrypts_the_update_against_the_plaintext_model(secret):
    app = ToyApp()
    reply = ckks_mod(message("train", record_of(global_model())), node_context(2), app.train)
    assert model_hash(app.seen[0]) == model_hash(record_of(global_model()))
    decrypted = decrypt_arrays(from_array_record(reply.content["arrays"], secret), secret)
    for key, value in delta_of(2).items():
        assert np.max(np.abs(decrypted[key].astype(np.float64) - value)) < 1e-3, key


def test_evaluate_decrypts_and_leaves_the_reply_alone(secret, public):
    app = ToyApp()
    reply = ckks_mod(
        message("evaluate", encrypted_global_record(secret, public)), node_context(), app.evaluate
    )
    expected = float(sum(np.sum(v) for v in expected_global().values()))
    assert not is_encrypted_record(app.seen[0])
    assert reply.content["metrics"]["sum"] == pytest.approx(expected, abs=1e-2)
    assert list(reply.content.array_records) == []


def test_without_the_flag_train_is_a_no_op():
    app = ToyApp()
    incoming = record_of(global_model())
    reply = ckks_mod(message("train", incoming, ckks=False), node_context(3), app.train)
    assert app.seen[0] is incoming
    assert not is_encrypted_record(reply.content["arrays"])
    trained = {k: global_model()[k] + delta_of(3)[k] for k in global_model()}
    assert model_hash(reply.content["arrays"]) == model_hash(record_of(trained))


def test_without_the_flag_evaluate_is_a_no_op(secret, public):
    app = ToyApp()
    incoming = encrypted_global_record(secret, public)
    ckks_mod(message("evaluate", incoming, ckks=False), node_context(3), app.evaluate)
    assert app.seen[0] is incoming
    assert list(app.seen[0].keys()) == [ENCRYPTED_ARRAY_KEY]


def test_flag_must_be_true_not_merely_present(secret):
    app = ToyApp()
    msg = message("train", record_of(global_model()), ckks=False, **{CKKS_CONFIG_KEY: False})
    reply = ckks_mod(msg, node_context(), app.train)
    assert not is_encrypted_record(reply.content["arrays"])


def test_no_key_is_an_error_reply_not_a_plaintext_one():
    app = ToyApp()
    reply = ckks_mod(
        message("train", record_of(global_model())), node_context(seed=None), app.train
    )
    assert reply.has_error()
    assert SECRET_CONTEXT_NODE_KEY in reply.error.reason
    assert KEY_SEED_RUN_KEY in reply.error.reason
    assert app.seen == []


def test_a_reply_that_does_not_match_the_global_model_is_not_sent(secret):
    def wrong_keys(msg, ctx):
        content = RecordDict(
            {"arrays": record_of({"other": np.ones(3)}), "metrics": MetricRecord({"n": 1})}
        )
        return Message(content, reply_to=msg)

    def non_finite(msg, ctx):
        model = global_model()
        model["fc.bias"][0] = np.nan
        return Message(RecordDict({"arrays": record_of(model)}), reply_to=msg)

    for handler, words in ((wrong_keys, "missing"), (non_finite, "non-finite")):
        reply = ckks_mod(message("train", record_of(global_model())), node_context(), handler)
        assert reply.has_error()
        assert words in reply.error.reason


def test_a_malformed_global_ciphertext_is_an_error_reply(secret):
    payload = np.frombuffer(b"BCSFL-CKKS-MODEL\x01garbage", dtype=np.uint8)
    garbage = ArrayRecord({ENCRYPTED_ARRAY_KEY: Array(payload)})
    app = ToyApp()
    reply = ckks_mod(message("evaluate", garbage), node_context(), app.evaluate)
    assert reply.has_error()
    assert "decrypt" in reply.error.reason
    assert app.seen == []


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the wrong key's noise
def test_node_config_secret_context_wins_over_the_seed(tmp_path, secret):
    own = create_secret_context(seed=b"another-key-ceremony-seed")
    path = tmp_path / "secret.ctx"
    save_secret_context(own, path)
    ctx = node_context(4, **{SECRET_CONTEXT_NODE_KEY: str(path)})
    assert node_secret_context(ctx) is node_secret_context(ctx)  # cached per process
    reply = ckks_mod(message("train", record_of(global_model())), ctx, ToyApp().train)
    update = from_array_record(reply.content["arrays"], own)
    decrypted = decrypt_arrays(update, own)
    assert np.max(np.abs(decrypted["fc.weight"] - delta_of(4)["fc.weight"])) < 1e-3
    wrong = decrypt_arrays(from_array_record(reply.content["arrays"], secret), secret)
    assert np.max(np.abs(wrong["fc.weight"] - delta_of(4)["fc.weight"])) > 1.0


def test_the_seed_must_be_an_int():
    with pytest.raises(TypeError, match=KEY_SEED_RUN_KEY):
        key_seed_bytes("7")
    ctx = node_context()
    ctx.run_config[KEY_SEED_RUN_KEY] = 7.5
    with pytest.raises(ValueError, match=KEY_SEED_RUN_KEY):
        node_secret_context(ctx)


# --------------------------------------------------------------------------------------
# The full ClientApp: mod order, routing of the queries
# --------------------------------------------------------------------------------------


def toy_client_app():
    app = bcsfl_ckks_client_app()
    toy = ToyApp()
    app.train()(toy.train)
    app.evaluate()(toy.evaluate)
    return app


def test_client_app_signs_the_ciphertext_it_sends(secret, public):
    app = toy_client_app()
    msg = message(
        "train",
        encrypted_global_record(secret, public),
        **signing_config(DOMAIN, development_keys=True),
    )
    reply = app(msg, node_context(2))
    sent = reply.content["arrays"]
    assert is_encrypted_record(sent)
    verifier = PacketVerifier(DOMAIN, [client_dev_account(2).address])
    accepted = verifier.verify(reply.content[PACKET_RECORD_KEY], sent, server_round=2)
    assert accepted.packet.model_hash == model_hash(sent)


def test_client_app_answers_the_public_context_query(secret):
    app = toy_client_app()
    msg = Message(RecordDict(), dst_node_id=1, message_type=PUBLIC_MESSAGE_TYPE)
    context = load_public_context(read_public_context(app(msg, node_context())))
    assert not context.is_private()
    update = EncryptedModel.deserialize(encrypt_arrays(delta_of(1), secret).serialize(), context)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_arrays(update, context)


def gram_of(secret, public, nodes=(1, 2, 3)):
    updates = [
        EncryptedModel.deserialize(encrypt_arrays(delta_of(n), secret).serialize(), public)
        for n in nodes
    ]
    flat = np.stack(
        [
            np.concatenate([v.astype(np.float64).ravel() for v in delta_of(n).values()])
            for n in nodes
        ]
    )
    return encrypted_gram(updates), flat @ flat.T


def test_gram_query_returns_the_matrix_and_its_digest(secret, public):
    enc, expected = gram_of(secret, public)
    app = toy_client_app()
    msg = Message(gram_request(enc.serialize(), 4), dst_node_id=1, message_type=GRAM_MESSAGE_TYPE)
    reply = app(msg, node_context())
    outcome = read_gram_reply(reply, 3)
    assert not isinstance(outcome, str), outcome
    matrix, digest = outcome
    assert np.max(np.abs(matrix - expected)) < 1e-3 * np.max(np.abs(expected))
    assert digest == gram_digest(matrix)
    assert read_gram_reply(reply, 4) == "Gram matrix is float64[3, 3], expected float64[4, 4]"


def test_gram_query_decrypts_one_gram_per_round(secret, public):
    first, _ = gram_of(secret, public)
    second, _ = gram_of(secret, public, nodes=(1, 2))
    ctx = node_context()

    def ask(gram, server_round):
        msg = Message(
            gram_request(gram.serialize(), server_round),
            dst_node_id=1,
            message_type=GRAM_MESSAGE_TYPE,
        )
        return ckks_gram(msg, ctx)

    assert not ask(first, 5).has_error()
    assert not ask(first, 5).has_error()  # a retry of the same request is answered
    refused = ask(second, 5)
    assert refused.has_error() and "different Gram" in refused.error.reason
    stale = ask(second, 4)
    assert stale.has_error() and "round 5" in stale.error.reason
    assert not ask(second, 6).has_error()


def test_gram_query_refuses_a_fresh_ciphertext(secret):
    # A curious server disguises six fresh encrypted values as a 3-model Gram matrix.
    fresh = ts.ckks_vector(secret, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]).ciphertext()[0]
    fake = EncryptedGram(3, 8, [fresh])
    msg = Message(gram_request(fake.serialize(), 1), dst_node_id=1, message_type=GRAM_MESSAGE_TYPE)
    reply = ckks_gram(msg, node_context())
    assert reply.has_error()
    assert "3 moduli left" in reply.error.reason


def test_gram_reply_with_a_lying_digest_is_unusable(secret, public):
    enc, _ = gram_of(secret, public)
    msg = Message(gram_request(enc.serialize(), 1), dst_node_id=1, message_type=GRAM_MESSAGE_TYPE)
    reply = ckks_gram(msg, node_context())
    reply.content[GRAM_DIGEST_RECORD_KEY] = ConfigRecord({"sha256": "00" * 32})
    assert read_gram_reply(reply, 3) == "reported sha256 does not match the returned matrix"


def test_gram_query_without_a_usable_request_is_an_error_reply():
    ctx = node_context()
    missing = Message(RecordDict(), dst_node_id=1, message_type=GRAM_MESSAGE_TYPE)
    reply = ckks_gram(missing, ctx)
    assert reply.has_error() and GRAM_REQUEST_RECORD_KEY in reply.error.reason
    bool_round = RecordDict(
        {GRAM_REQUEST_RECORD_KEY: ConfigRecord({"gram": b"x", "server-round": True})}
    )
    reply = ckks_gram(Message(bool_round, dst_node_id=1, message_type=GRAM_MESSAGE_TYPE), ctx)
    assert reply.has_error() and "must be an int" in reply.error.reason
    garbage = Message(gram_request(b"garbage", 1), dst_node_id=1, message_type=GRAM_MESSAGE_TYPE)
    reply = ckks_gram(garbage, ctx)
    assert reply.has_error() and "refuses to decrypt" in reply.error.reason
    # none of these consumed the node's one Gram of round 1
    assert "bcsfl.ckks-gram-log" not in ctx.state.config_records


# --------------------------------------------------------------------------------------
# Config under another record name (FedAvg's ``configrecord_key``)
# --------------------------------------------------------------------------------------


class OneNodeGrid:
    def get_node_ids(self):
        return [1]


def test_train_config_under_another_record_name_switches_ckks_on(secret, public):
    strategy = FedAvg(configrecord_key="fit-settings", min_available_nodes=1, min_train_nodes=1)
    config = ConfigRecord({CKKS_CONFIG_KEY: True, **signing_config(DOMAIN, development_keys=True)})
    incoming = encrypted_global_record(secret, public)
    (msg,) = strategy.configure_train(2, incoming, config, OneNodeGrid())
    assert list(msg.content.config_records) == ["fit-settings"]
    app = ToyApp()
    toy = bcsfl_ckks_client_app()
    toy.train()(app.train)
    reply = toy(msg, node_context(3))

    assert not is_encrypted_record(app.seen[0])  # decrypted for the app
    sent = reply.content["arrays"]
    decrypted = decrypt_arrays(from_array_record(sent, public), secret)
    for key, value in delta_of(3).items():
        assert np.max(np.abs(decrypted[key].astype(np.float64) - value)) < 1e-3, key
    verifier = PacketVerifier(DOMAIN, [client_dev_account(3).address])
    assert verifier.verify(reply.content[PACKET_RECORD_KEY], sent, server_round=2)


def test_validation_requests_under_another_record_name_are_decrypted(secret, public):
    (request,) = validation_requests(
        ["1"],
        {"candidate": encrypted_global_record(secret, public)},
        3,
        arrayrecord_key="weights",
        configrecord_key="evaluate-settings",
        extra_config={CKKS_CONFIG_KEY: True},
    )

    def evaluate(msg, ctx):
        received = msg.content["weights"]
        assert not is_encrypted_record(received)
        total = float(sum(np.sum(received[k].numpy()) for k in received))
        return Message(RecordDict({"metrics": MetricRecord({"sum": total})}), reply_to=msg)

    reply = ckks_mod(request.message, node_context(), evaluate)
    expected = float(sum(np.sum(v) for v in expected_global().values()))
    assert reply.content["metrics"]["sum"] == pytest.approx(expected, abs=1e-2)
