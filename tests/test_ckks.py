import hashlib
import os
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from tenseal import sealapi
from torch import nn

from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    EncryptedModel,
    add,
    add_plain,
    array_specs,
    ciphertext_digest,
    decrypt_arrays,
    encrypt_arrays,
    from_array_record,
    is_encrypted_record,
    to_array_record,
    weighted_mean,
    weighted_sum,
)
from bcsfl_flower.privacy.ckks_keys import (
    CKKSParams,
    create_secret_context,
    load_context,
    load_public_context,
    load_secret_context,
    public_context,
    save_secret_context,
    slot_count,
)
from bcsfl_flower.privacy.encrypted_screening import (
    EncryptedGram,
    decrypt_gram,
    encrypted_gram,
    gram_to_cosine,
)
from bcsfl_flower.round.bounds import bound_updates
from bcsfl_flower.round.screening import screen_updates

SEED = b"bcsfl-test-seed-0123456789"


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def shapes():
    return {k: tuple(v.shape) for k, v in _cnn().state_dict().items()}


@pytest.fixture(scope="module")
def secret():
    return create_secret_context(seed=SEED)


@pytest.fixture(scope="module")
def public_bytes(secret):
    return public_context(secret)


@pytest.fixture(scope="module")
def server(public_bytes):
    return load_public_context(public_bytes)


def _random_model(rng, shapes, scale=0.05):
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(v).astype(np.float64) for v in arrays.values()])


def _to_server(model: EncryptedModel, server) -> EncryptedModel:
    """What the server holds: the client's bytes, deserialised with the public context."""
    return EncryptedModel.deserialize(model.serialize(), server)


def test_the_mnist_cnn_needs_six_ciphertexts(secret, shapes):
    arrays = _random_model(np.random.default_rng(0), shapes)
    assert sum(v.size for v in arrays.values()) == 20522
    encrypted = encrypt_arrays(arrays, secret)
    assert slot_count(secret) == 4096
    assert len(encrypted.chunks) == 6
    assert encrypted.specs == array_specs(arrays)


def test_aggregate_decrypts_to_the_plaintext_weighted_mean(secret, server, shapes):
    rng = np.random.default_rng(1)
    models = [_random_model(rng, shapes) for _ in range(5)]
    num_examples = [120, 80, 200, 50, 150]
    received = [_to_server(encrypt_arrays(m, secret), server) for m in models]

    aggregate = weighted_mean(received, num_examples)

    decrypted = decrypt_arrays(_to_server(aggregate, secret), secret)
    weights = np.asarray(num_examples, dtype=np.float64) / sum(num_examples)
    for key in shapes:
        expected = sum(w * m[key].astype(np.float64) for w, m in zip(weights, models, strict=True))
        assert decrypted[key].shape == expected.shape
        assert decrypted[key].dtype == np.float32
        np.testing.assert_allclose(decrypted[key], expected, atol=1e-3, rtol=0)
    # the tolerance is not vacuous: an unweighted mean is further off than 1e-3
    unweighted = np.mean([_flat(m) for m in models], axis=0)
    assert np.abs(_flat(decrypted) - unweighted).max() > 1e-3


def test_encrypted_global_model_accumulates_rounds(secret, server, shapes):
    rng = np.random.default_rng(2)
    initial = _random_model(rng, shapes, scale=0.3)
    expected = _flat(initial)
    global_model = None
    for _ in range(3):
        updates = [_random_model(rng, shapes, scale=0.01) for _ in range(3)]
        counts = [10, 30, 60]
        received = [_to_server(encrypt_arrays(u, secret), server) for u in updates]
        aggregate = weighted_mean(received, counts)
        if global_model is None:
            global_model = add_plain(aggregate, initial)
        else:
            global_model = add(global_model, aggregate)
        global_model = _to_server(global_model, server)  # what the strategy stores
        expected = expected + sum(c / 100 * _flat(u) for c, u in zip(counts, updates, strict=True))
    decrypted = _flat(decrypt_arrays(_to_server(global_model, secret), secret))
    np.testing.assert_allclose(decrypted, expected, atol=1e-5, rtol=0)


def test_server_context_cannot_decrypt(secret, public_bytes, server, shapes):
    assert secret.is_private()
    assert not server.is_private()
    assert not load_context(public_bytes).is_private()
    arrays = _random_model(np.random.default_rng(3), shapes)
    received = _to_server(encrypt_arrays(arrays, secret), server)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_arrays(received, server)
    with pytest.raises(ValueError, match="secret_key"):
        received.chunks[0].decrypt()
    gram = encrypted_gram([received])
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_gram(gram, server)


def test_public_context_is_smaller_than_tenseal_defaults_but_complete(public_bytes, server):
    assert server.has_public_key()
    assert server.has_relin_keys()
    assert server.has_galois_keys()
    assert len(public_bytes) < 16_000_000


def test_server_refuses_a_context_with_a_secret_key(secret):
    with pytest.raises(ValueError, match="secret key"):
        load_public_context(secret.serialize(save_secret_key=True))
    no_eval_keys = secret.serialize(save_secret_key=False)
    with pytest.raises(ValueError, match="Galois"):
        load_public_context(no_eval_keys)


def test_same_seed_gives_the_same_key_and_other_keys_cannot_decrypt(secret, shapes):
    arrays = _random_model(np.random.default_rng(4), shapes)
    data = encrypt_arrays(arrays, secret).serialize()

    other_client = create_secret_context(seed=SEED)
    decrypted = decrypt_arrays(EncryptedModel.deserialize(data, other_client), other_client)
    np.testing.assert_allclose(_flat(decrypted), _flat(arrays), atol=1e-5)

    for stranger in (
        create_secret_context(seed=b"another-seed-0123456789"),
        create_secret_context(),
    ):
        garbage = decrypt_arrays(EncryptedModel.deserialize(data, stranger), stranger)
        assert not np.allclose(_flat(garbage), _flat(arrays), atol=1e-2)


def test_encryption_is_randomised_even_with_a_seeded_key(secret, shapes):
    arrays = _random_model(np.random.default_rng(5), shapes)
    first = encrypt_arrays(arrays, secret)
    second = encrypt_arrays(arrays, secret)
    assert first.serialize() != second.serialize()
    assert ciphertext_digest(first) != ciphertext_digest(second)


def test_serialisation_round_trip_and_digest(secret, server, shapes):
    arrays = _random_model(np.random.default_rng(6), shapes)
    encrypted = encrypt_arrays(arrays, secret)
    data = encrypted.serialize()
    restored = EncryptedModel.deserialize(data, server)
    assert restored.specs == encrypted.specs
    assert restored.serialize() == data
    assert ciphertext_digest(restored) == ciphertext_digest(encrypted)
    assert ciphertext_digest(encrypted) == hashlib.sha256(data).digest()
    decrypted = decrypt_arrays(EncryptedModel.deserialize(data, secret), secret)
    assert list(decrypted) == list(arrays)
    np.testing.assert_allclose(_flat(decrypted), _flat(arrays), atol=1e-5)


def test_array_record_transport(secret, server, shapes):
    arrays = _random_model(np.random.default_rng(7), shapes)
    encrypted = encrypt_arrays(arrays, secret)
    record = to_array_record(encrypted)
    assert list(record.keys()) == [ENCRYPTED_ARRAY_KEY]
    assert is_encrypted_record(record)
    assert not is_encrypted_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    restored = from_array_record(record, server)
    assert ciphertext_digest(restored) == ciphertext_digest(encrypted)
    with pytest.raises(ValueError, match=ENCRYPTED_ARRAY_KEY):
        from_array_record(ArrayRecord({k: Array(v) for k, v in arrays.items()}), server)


def test_integer_arrays_are_rounded_back(secret):
    arrays = {"w": np.linspace(-1, 1, 10, dtype=np.float32), "count": np.array([7], dtype=np.int64)}
    decrypted = decrypt_arrays(encrypt_arrays(arrays, secret), secret)
    assert decrypted["count"].dtype == np.int64
    assert decrypted["count"][0] == 7


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"garbage", "magic"),
        (b"BCSFL-CKKS-MODEL\x01\x00\x00\x00\x05{}", "truncated"),
    ],
)
def test_malformed_bytes_are_rejected(server, data, match):
    with pytest.raises(ValueError, match=match):
        EncryptedModel.deserialize(data, server)


def test_truncated_and_padded_models_are_rejected(secret, server):
    data = encrypt_arrays({"w": np.ones(10, dtype=np.float32)}, secret).serialize()
    with pytest.raises(ValueError, match="truncated"):
        EncryptedModel.deserialize(data[:-10], server)
    with pytest.raises(ValueError, match="trailing"):
        EncryptedModel.deserialize(data + b"\x00", server)


def test_invalid_inputs_are_rejected(secret, server):
    good = encrypt_arrays({"w": np.ones(10, dtype=np.float32)}, secret)
    other = encrypt_arrays({"v": np.ones(10, dtype=np.float32)}, secret)
    with pytest.raises(ValueError, match="non-finite"):
        encrypt_arrays({"w": np.array([1.0, np.nan])}, secret)
    with pytest.raises(TypeError, match="real numbers"):
        encrypt_arrays({"w": np.array(["a"])}, secret)
    with pytest.raises(ValueError, match="empty"):
        encrypt_arrays({}, secret)
    with pytest.raises(ValueError, match="layout"):
        weighted_sum([good, other], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 models but 1 weights"):
        weighted_sum([good, good], [1.0])
    with pytest.raises(ValueError, match="all weights are 0"):
        weighted_sum([good], [0.0])
    with pytest.raises(ValueError, match="not finite"):
        weighted_sum([good], [float("inf")])
    with pytest.raises(ValueError, match="num_examples"):
        weighted_mean([good], [-1])
    with pytest.raises(ValueError, match="layout"):
        add(good, other)
    with pytest.raises(ValueError, match="keys and shapes"):
        add_plain(good, {"w": np.ones(11)})
    with pytest.raises(TypeError, match="EncryptedModel"):
        ciphertext_digest(b"not a model")


def test_zero_weight_models_are_left_out(secret):
    a = encrypt_arrays({"w": np.full(10, 2.0)}, secret)
    b = encrypt_arrays({"w": np.full(10, 100.0)}, secret)
    result = decrypt_arrays(weighted_sum([a, b], [0.5, 0.0]), secret)
    np.testing.assert_allclose(result["w"], 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"poly_modulus_degree": 5000}, "power of two"),
        ({"poly_modulus_degree": 2048}, "power of two"),
        ({"coeff_mod_bit_sizes": (60, 40, 60)}, "at least 4"),
        ({"coeff_mod_bit_sizes": (60, 40, 30, 60)}, "global_scale_bits"),
        ({"coeff_mod_bit_sizes": (40, 40, 40, 60)}, "first and last"),
        ({"global_scale_bits": 10}, "global_scale_bits"),
    ],
)
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CKKSParams(**kwargs)


def test_insecure_parameters_are_rejected_by_seal():
    params = CKKSParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 40, 40, 60))
    with pytest.raises(ValueError, match="security"):
        create_secret_context(params)


def test_short_seed_is_rejected():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        create_secret_context(seed=b"short")
    with pytest.raises(TypeError, match="bytes"):
        create_secret_context(seed="a string seed of enough length")


def test_secret_context_file_round_trip(tmp_path, secret, shapes):
    path = tmp_path / "ckks-secret.ctx"
    save_secret_context(secret, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["ckks-secret.ctx"]
    loaded = load_secret_context(path)
    arrays = _random_model(np.random.default_rng(8), shapes)
    data = encrypt_arrays(arrays, secret).serialize()
    decrypted = decrypt_arrays(EncryptedModel.deserialize(data, loaded), loaded)
    np.testing.assert_allclose(_flat(decrypted), _flat(arrays), atol=1e-5)
    with pytest.raises(ValueError, match="does not exist"):
        load_secret_context(tmp_path / "missing.ctx")
    (tmp_path / "public.ctx").write_bytes(public_context(secret))
    with pytest.raises(ValueError, match="no secret key"):
        load_secret_context(tmp_path / "public.ctx")


def _cosines(matrix: np.ndarray) -> np.ndarray:
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return unit @ unit.T


def _screen(gram: np.ndarray):
    """Screen a round of equally weighted clients from its Gram matrix, as the pipeline does."""
    size = gram.shape[0]
    bounds = bound_updates(
        np.sqrt(np.clip(np.diag(gram), 0, None)), np.full(size, 10.0), np.ones(size)
    )
    return screen_updates(gram, bounds)


def _updates_with_a_flipped_client(rng, shapes, n=5, flipped=3):
    direction = _random_model(rng, shapes, scale=0.02)
    updates = []
    for k in range(n):
        noise = _random_model(rng, shapes, scale=0.01)
        sign = -1.0 if k == flipped else 1.0
        updates.append({key: sign * (direction[key] + noise[key]) for key in shapes})
    return updates


def test_encrypted_gram_matches_plaintext_gram(secret, server, shapes):
    rng = np.random.default_rng(9)
    updates = _updates_with_a_flipped_client(rng, shapes)
    received = [_to_server(encrypt_arrays(u, secret), server) for u in updates]

    encrypted = encrypted_gram(received)
    data = encrypted.serialize()
    # the committee receives the bytes and decrypts only the Gram entries
    gram = decrypt_gram(EncryptedGram.deserialize(data, secret), secret)

    matrix = np.stack([_flat(u) for u in updates])
    expected = matrix @ matrix.T
    np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gram_to_cosine(gram), _cosines(matrix), atol=1e-4, rtol=0)
    assert EncryptedGram.deserialize(data, server).serialize() == data


def test_encrypted_screening_rejects_the_flipped_update_like_plaintext(secret, server, shapes):
    rng = np.random.default_rng(10)
    updates = _updates_with_a_flipped_client(rng, shapes, n=5, flipped=3)
    matrix = np.stack([_flat(u) for u in updates])
    plain = _screen(matrix @ matrix.T)

    received = [_to_server(encrypt_arrays(u, secret), server) for u in updates]
    gram = decrypt_gram(encrypted_gram(received), secret)
    encrypted = _screen(gram)

    assert plain.rejected == (3,)
    # the flipped update is as long as the others: the direction test rejects it
    assert "outside the stake-majority cluster" in plain.reasons[3]
    assert encrypted.rejected == plain.rejected
    assert encrypted.trusted == plain.trusted
    assert encrypted.split_threshold == plain.split_threshold


@pytest.mark.parametrize("pairs_per_ciphertext", [1, 4, 16])
def test_gram_can_be_split_over_several_packed_ciphertexts(secret, server, pairs_per_ciphertext):
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(4, 8))
    received = [_to_server(encrypt_arrays({"w": v}, secret), server) for v in vectors]
    encrypted = encrypted_gram(received, pairs_per_ciphertext=pairs_per_ciphertext)
    # 10 entries: 10 ciphertexts of 1, 3 of 4 (4 + 4 + 2), or 1 of 16
    assert len(encrypted.packed) == -(-10 // pairs_per_ciphertext)
    restored = EncryptedGram.deserialize(encrypted.serialize(), secret)
    np.testing.assert_allclose(decrypt_gram(restored, secret), vectors @ vectors.T, atol=1e-4)


def test_every_decrypted_slot_holds_a_whole_gram_entry(secret, server):
    """The committee sees Gram entries only: no slot holds a partial inner product."""
    rng = np.random.default_rng(12)
    vectors = rng.normal(size=(4, 5000))  # two ciphertexts per update
    received = [_to_server(encrypt_arrays({"w": v}, secret), server) for v in vectors]
    encrypted = encrypted_gram(received, pairs_per_ciphertext=4)
    rows, columns = np.triu_indices(4)
    expected = (vectors @ vectors.T)[rows, columns]
    seal_context = secret.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, secret.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    for index, ciphertext in enumerate(encrypted.packed):
        plaintext = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plaintext)
        slots = np.asarray(encoder.decode_double(plaintext))
        entries = np.zeros(4)
        chunk = expected[4 * index : 4 * index + 4]
        entries[: len(chunk)] = chunk  # residues without a pair hold 0
        np.testing.assert_allclose(slots, np.tile(entries, len(slots) // 4), atol=1e-3)


@pytest.mark.parametrize("bad", [0, 3, 12, True, 2.0])
def test_gram_refuses_a_pair_count_that_is_not_a_power_of_two(secret, server, bad):
    received = [_to_server(encrypt_arrays({"w": np.ones(4)}, secret), server)]
    with pytest.raises(ValueError, match="pairs_per_ciphertext"):
        encrypted_gram(received, pairs_per_ciphertext=bad)


def test_gram_refuses_aggregated_ciphertexts(secret, server):
    update = _to_server(encrypt_arrays({"w": np.ones(10)}, secret), server)
    aggregate = weighted_mean([update, update], [1, 1])
    with pytest.raises(ValueError, match="fresh"):
        encrypted_gram([aggregate, update])
    with pytest.raises(ValueError, match="at least one"):
        encrypted_gram([])


def test_gram_to_cosine_guards_zero_and_noisy_norms():
    gram = np.array([[4.0, 2.0, 1e-9], [2.0, 4.0, -1e-9], [1e-9, -1e-9, -1e-8]])
    cosine = gram_to_cosine(gram)
    np.testing.assert_allclose(cosine, [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="square"):
        gram_to_cosine(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        gram_to_cosine(np.array([[np.nan]]))


def test_torch_state_dict_round_trips(secret):
    state = {k: v.numpy() for k, v in _cnn().state_dict().items()}
    decrypted = decrypt_arrays(encrypt_arrays(state, secret), secret)
    assert list(decrypted) == list(state)
    for key, value in state.items():
        assert decrypted[key].dtype == value.dtype
        np.testing.assert_allclose(decrypted[key], value, atol=1e-5)
