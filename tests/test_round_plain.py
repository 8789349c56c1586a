"""Plaintext updates: the Gram matrix and candidates from unit directions and norms."""

import numpy as np
import pytest
from flower_messages import train_reply
from flwr.app import Array, ArrayRecord

from bcsfl_flower.round.checks import check_replies
from bcsfl_flower.round.plain import PlainSpace
from bcsfl_flower.round.settings import SettingError
from bcsfl_flower.round.space import UPDATE_SPACES, update_space


def model(rng, scale=1.0):
    return {
        "w": (scale * rng.normal(size=(3, 4))).astype(np.float32),
        "b": (scale * rng.normal(size=4)).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }


def batch_of(global_arrays, client_models):
    space = PlainSpace()
    replies = [train_reply(i + 1, m) for i, m in enumerate(client_models)]
    checked = check_replies(
        replies, space.collector(global_arrays, len(replies)), "num-examples", 1
    )
    assert not checked.rejected
    return space, checked.batch


def flat(arrays, keys=("w", "b", "steps")):
    return np.concatenate([np.ravel(arrays[k]).astype(np.float64) for k in keys])


def test_gram_matches_the_inner_products_of_the_updates():
    rng = np.random.default_rng(0)
    start = model(rng)
    clients = [model(rng, scale) for scale in (0.5, 1.0, 2.0, 1e6)]
    space, batch = batch_of(ArrayRecord({k: Array(v) for k, v in start.items()}), clients)
    updates = np.stack([flat(c) - flat(start) for c in clients])
    expected = updates @ updates.T
    gram = space.gram(batch, None).matrix
    np.testing.assert_allclose(gram, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(gram, gram.T)


def test_candidates_are_global_plus_weighted_updates_in_the_original_dtypes():
    rng = np.random.default_rng(1)
    start = model(rng)
    clients = [model(rng) for _ in range(3)]
    clients[1]["steps"] = np.array(9, dtype=np.int64)
    global_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    space, batch = batch_of(global_arrays, clients)
    coefficients = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.1]])
    candidates = space.combine(global_arrays, batch, coefficients)
    updates = np.stack([flat(c) - flat(start) for c in clients])
    for row, candidate in zip(coefficients, candidates, strict=True):
        assert list(candidate.keys()) == ["w", "b", "steps"]
        assert candidate["w"].numpy().dtype == np.float32
        assert candidate["steps"].numpy().dtype == np.int64
        np.testing.assert_allclose(
            flat({k: candidate[k].numpy() for k in candidate}),
            _rounded_ints(flat(start) + row @ updates),
            rtol=1e-5,
            atol=1e-5,
        )


def _rounded_ints(values):
    values = values.copy()
    values[-1] = np.rint(values[-1])  # the int64 "steps" entry is last
    return values


def test_zero_updates_and_an_empty_batch_stay_finite():
    rng = np.random.default_rng(2)
    start = model(rng)
    global_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    space, batch = batch_of(global_arrays, [start, start])
    assert np.all(space.gram(batch, None).matrix == 0)
    (candidate,) = space.combine(global_arrays, batch, np.array([[0.5, 0.5]]))
    np.testing.assert_array_equal(candidate["w"].numpy(), start["w"])
    empty_space, empty = batch_of(global_arrays, [])
    assert empty.size == 0 and empty_space.gram(empty, None).matrix.shape == (0, 0)


def test_update_spaces_come_from_a_registry():
    assert set(UPDATE_SPACES) == {"plain", "ckks"}
    assert isinstance(update_space("plain"), PlainSpace)
    with pytest.raises(ValueError, match="update space must be one of"):
        update_space("rot13")
    assert issubclass(SettingError, ValueError)


def test_large_models_are_compared_on_a_sketch_with_bounded_error(monkeypatch):
    from bcsfl_flower.round import plain

    dim = plain.EXACT_DIMENSION + 7_777  # not a multiple of the sketch width
    rng = np.random.default_rng(4)
    start = rng.normal(size=dim).astype(np.float32)
    direction = rng.normal(size=dim)
    clients = [
        (start + s * (direction + rng.normal(size=dim))).astype(np.float32)
        for s in (0.1, 1.0, -1.0, 3.0, 1e3)
    ]
    global_arrays = ArrayRecord({"w": Array(start)})
    seeds = iter([11, 12])
    monkeypatch.setattr(plain.secrets, "randbits", lambda bits: next(seeds))
    space, batch = batch_of_flat(global_arrays, clients)
    result = space.gram(batch, None)
    assert result.record == {"sketch_dimension": plain.SKETCH_DIMENSION, "sketch_seed": 11}
    updates = np.stack([c.astype(np.float64) - start for c in clients])
    norms = np.linalg.norm(updates, axis=1)
    exact = (updates @ updates.T) / np.outer(norms, norms)
    estimated = result.matrix / np.outer(batch.norms, batch.norms)
    np.testing.assert_allclose(np.diag(result.matrix), norms**2, rtol=1e-5)
    # Standard error ~ 1/sqrt(8192) = 0.011; five of them is far beyond chance.
    assert np.abs(estimated - exact).max() < 5 / np.sqrt(plain.SKETCH_DIMENSION)
    # Candidates still use the exact updates.
    (candidate,) = space.combine(global_arrays, batch, np.array([[0.5, 0.5, 0, 0, 0]]))
    np.testing.assert_allclose(
        candidate["w"].numpy(), start + 0.5 * (updates[0] + updates[1]), rtol=1e-4, atol=1e-4
    )
    # A new round draws new signs.
    _, second = batch_of_flat(global_arrays, clients)
    assert second.sketch_seed == 12


def batch_of_flat(global_arrays, rows):
    space = PlainSpace()
    replies = [train_reply(i + 1, {"w": row}) for i, row in enumerate(rows)]
    collector = space.collector(global_arrays, len(replies))
    checked = check_replies(replies, collector, "num-examples", 1)
    assert not checked.rejected
    return space, checked.batch
