"""CKKS-encrypted models and their aggregation without the secret key.

A model (``dict`` of numpy arrays, in key order) is flattened, zero-padded to a
multiple of the slot count (4096 for the default parameters) and encrypted as one
TenSEAL ``CKKSVector`` per full chunk. Full chunks matter for screening: summing a
full chunk's slots by rotations leaves the total in *every* slot, so a decrypted
inner product reveals that scalar and nothing else (see
:mod:`bcsfl_flower.privacy.encrypted_screening`).

The round in CKKS mode
    The client decrypts the global model ``w_t``, trains, and sends the encrypted
    *update* ``D_k = Enc(w_k - w_t)`` (not ``w_k``). The server, holding only the
    public context, screens the updates (encrypted Gram matrix) and computes
    ``Agg = sum_k (n_k / N) * D_k`` over the trusted ones (:func:`weighted_mean`:
    one plaintext-scalar product per ciphertext, no decryption). It keeps the global
    model encrypted: ``W_1 = add_plain(Agg_1, w_0)`` in the first round (the initial
    model is public) and ``W_{t+1} = add(W_t, Agg_{t+1})`` afterwards. Every ``W`` and
    ``Agg`` is one rescaling below a fresh ciphertext, so their levels and scales
    match round after round and the noise only grows additively. Clients decrypt
    ``W_{t+1}``; nobody ever decrypts an individual ``D_k``.

Transport
    :meth:`EncryptedModel.serialize` gives canonical bytes; :func:`to_array_record`
    puts them in a Flower ``ArrayRecord`` as a single ``uint8`` array under
    :data:`ENCRYPTED_ARRAY_KEY`. We recommend the ``ArrayRecord`` over a
    ``ConfigRecord`` of bytes: the message keeps its usual "arrays" slot, Flower's
    size accounting and chunked transfer of arrays apply, and hashing the record's
    arrays hashes the ciphertext bytes.

Hashing
    :func:`ciphertext_digest` is SHA-256 over :meth:`EncryptedModel.serialize`, the
    digest to anchor for an encrypted global model. The encoding is canonical: a
    ciphertext serialises to the same bytes after a round trip, and the header is
    compact JSON with sorted keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord

from bcsfl_flower.extras import import_extra
from bcsfl_flower.privacy.ckks_keys import slot_count

if TYPE_CHECKING:  # the real modules, for annotations
    import tenseal as ts
else:
    ts = import_extra("ckks", "tenseal", "CKKS aggregation")

ENCRYPTED_ARRAY_KEY = "bcsfl.ckks"
"""The only key of an ``ArrayRecord`` that carries an encrypted model."""

_MAGIC = b"BCSFL-CKKS-MODEL\x01"
_HEADER_LENGTH = struct.Struct(">I")
_CHUNK_LENGTH = struct.Struct(">Q")


class ArraySpec(NamedTuple):
    """Key, dtype and shape of one array of a model (what a ciphertext cannot show)."""

    key: str
    dtype: str
    shape: tuple[int, ...]


class EncryptedModel:
    """A model's arrays encrypted as CKKS ciphertexts of ``slots`` values each.

    Parameters
    ----------
    specs : Sequence[ArraySpec]
        Key, dtype and shape of each array, in order.
    chunks : Sequence[ts.CKKSVector]
        Ciphertexts of the flattened, zero-padded values, ``slots`` values each.
    slots : int
        Values per ciphertext.
    """

    def __init__(
        self, specs: Sequence[ArraySpec], chunks: Sequence[ts.CKKSVector], slots: int
    ) -> None:
        self.specs = tuple(ArraySpec(s.key, s.dtype, tuple(s.shape)) for s in specs)
        self.chunks = list(chunks)
        self.slots = int(slots)
        needed = math.ceil(self.num_values / self.slots)
        if len(self.chunks) != needed:
            raise ValueError(
                f"{self.num_values} values in chunks of {self.slots} need {needed} "
                f"ciphertexts, got {len(self.chunks)}"
            )

    @property
    def num_values(self) -> int:
        """Number of model parameters (without padding)."""
        return sum(math.prod(spec.shape) for spec in self.specs)

    def serialize(self) -> bytes:
        """Return the canonical bytes: magic, length-prefixed JSON header, chunks.

        Layout: the magic ``BCSFL-CKKS-MODEL`` and a version byte, a big-endian uint32
        header length, the header (compact UTF-8 JSON with sorted keys: ``arrays`` as
        ``[key, dtype, shape]`` triples, ``chunks``, ``slots``), then per ciphertext a
        big-endian uint64 length and TenSEAL's serialisation of the ``CKKSVector``.
        """
        header = json.dumps(
            {
                "arrays": [[s.key, s.dtype, list(s.shape)] for s in self.specs],
                "chunks": len(self.chunks),
                "slots": self.slots,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        parts = [_MAGIC, _HEADER_LENGTH.pack(len(header)), header]
        for chunk in self.chunks:
            data = chunk.serialize()
            parts += [_CHUNK_LENGTH.pack(len(data)), data]
        return b"".join(parts)

    @classmethod
    def deserialize(cls, data: bytes, context: ts.Context) -> EncryptedModel:
        """Rebuild an encrypted model from :meth:`serialize` bytes, linked to ``context``.

        Raises
        ------
        ValueError
            If ``data`` is not a complete, well-formed encrypted model.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        view = memoryview(data)
        if bytes(view[: len(_MAGIC)]) != _MAGIC:
            raise ValueError("not a serialised encrypted model (bad magic bytes)")
        offset = len(_MAGIC)
        (header_length,) = _read(_HEADER_LENGTH, view, offset)
        offset += _HEADER_LENGTH.size
        if offset + header_length > len(view):
            raise ValueError("encrypted model is truncated in its header")
        try:
            header = load_header(bytes(view[offset : offset + header_length]), max_depth=4)
            specs = [
                ArraySpec(str(k), str(d), tuple(int(n) for n in s)) for k, d, s in header["arrays"]
            ]
            num_chunks, slots = int(header["chunks"]), int(header["slots"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"encrypted model has a malformed header: {error}") from error
        if num_chunks < 1 or slots < 1:
            raise ValueError(f"encrypted model declares {num_chunks} chunks of {slots} slots")
        offset += header_length
        chunks = []
        for index in range(num_chunks):
            (length,) = _read(_CHUNK_LENGTH, view, offset)
            offset += _CHUNK_LENGTH.size
            if offset + length > len(view):
                raise ValueError(f"encrypted model is truncated in ciphertext {index}")
            try:
                chunks.append(ts.ckks_vector_from(context, bytes(view[offset : offset + length])))
            except Exception as error:  # TenSEAL raises bare C++ errors on bad input
                raise ValueError(f"ciphertext {index} does not deserialise: {error}") from error
            offset += length
        if offset != len(view):
            raise ValueError(f"{len(view) - offset} trailing bytes after the encrypted model")
        for index, chunk in enumerate(chunks):
            if chunk.size() != slots:
                raise ValueError(f"ciphertext {index} holds {chunk.size()} values, not {slots}")
        return cls(specs, chunks, slots)


MAX_HEADER_BYTES = 1 << 20
"""Largest JSON header a serialised ciphertext may carry."""


def load_header(data: bytes, max_depth: int) -> Any:
    """Parse a serialised ciphertext's JSON header, refusing deep nesting before parsing.

    The header comes from another party. Python's JSON parser recurses once per level
    of nesting, and libraries loaded beside it (py_ecc) raise the interpreter's
    recursion limit far enough that a header nested 100,000 deep crashes the process
    instead of raising; so the depth is counted first, on the raw bytes.

    Raises
    ------
    ValueError
        If the header is longer than :data:`MAX_HEADER_BYTES`, nests deeper than
        ``max_depth``, or is not JSON.
    """
    if len(data) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            escaped = not escaped and byte == 0x5C  # backslash
            in_string = escaped or byte != 0x22  # closing quote
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                raise ValueError(f"header nests deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return json.loads(data)


def array_specs(arrays: Mapping[str, np.ndarray]) -> tuple[ArraySpec, ...]:
    """Return the specs of plaintext ``arrays``, to compare with an encrypted model's."""
    return tuple(
        ArraySpec(key, np.asarray(value).dtype.str, tuple(np.shape(value)))
        for key, value in arrays.items()
    )


def encrypt_arrays(arrays: Mapping[str, np.ndarray], context: ts.Context) -> EncryptedModel:
    """Encrypt a model's arrays with the public key of ``context``.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        Real (float or integer) arrays with finite values, e.g. a client's update
        ``w_k - w_t``. The mapping's order is the order of encryption.
    context : ts.Context
        Any context with a public key (clients use their secret context).

    Returns
    -------
    EncryptedModel
        ``ceil(parameters / slots)`` fresh ciphertexts.
    """
    _require_context(context)
    specs = _validate_arrays(arrays)
    slots = slot_count(context)
    flat = _flatten(arrays, slots)
    chunks = [ts.ckks_vector(context, flat[i : i + slots]) for i in range(0, flat.size, slots)]
    return EncryptedModel(specs, chunks, slots)


def decrypt_arrays(model: EncryptedModel, secret_context: ts.Context) -> dict[str, np.ndarray]:
    """Decrypt a model back to arrays of its original keys, shapes and dtypes.

    CKKS is approximate: values come back with an absolute error around ``1e-7`` for
    the default parameters; integer arrays are rounded.

    Raises
    ------
    ValueError
        If ``secret_context`` holds no secret key.
    """
    _require_model(model, "model")
    _require_context(secret_context)
    if not secret_context.is_private():
        raise ValueError("secret_context holds no secret key and cannot decrypt")
    secret_key = secret_context.secret_key()
    flat = np.concatenate(
        [np.asarray(c.decrypt(secret_key), dtype=np.float64) for c in model.chunks]
    )
    arrays, start = {}, 0
    for spec in model.specs:
        size = math.prod(spec.shape)
        values = flat[start : start + size].reshape(spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            values = np.rint(values)
        arrays[spec.key] = values.astype(dtype)
        start += size
    return arrays


def weighted_sum(models: Sequence[EncryptedModel], weights: Sequence[float]) -> EncryptedModel:
    """Return ``sum_k weights[k] * models[k]`` computed on ciphertexts.

    Each ciphertext is multiplied by a plaintext scalar (one rescaling) and the
    products are added; no secret key is involved. Models with weight 0 are left out
    (SEAL refuses to multiply by an all-zero plaintext).

    Raises
    ------
    ValueError
        If the lists are empty or differ in length, the models differ in layout, a
        weight is not finite, or every weight is 0.
    """
    models = list(models)
    weights = [float(w) for w in weights]
    if not models:
        raise ValueError("weighted_sum needs at least one model")
    if len(models) != len(weights):
        raise ValueError(f"got {len(models)} models but {len(weights)} weights")
    for index, (model, weight) in enumerate(zip(models, weights, strict=True)):
        _require_model(model, f"models[{index}]")
        _require_same_layout(models[0], model, f"models[{index}]")
        if not math.isfinite(weight):
            raise ValueError(f"weights[{index}] is not finite: {weight}")
    terms = [(m, w) for m, w in zip(models, weights, strict=True) if w != 0.0]
    if not terms:
        raise ValueError("all weights are 0")
    chunks = []
    for index in range(len(models[0].chunks)):
        total = terms[0][0].chunks[index] * terms[0][1]
        for model, weight in terms[1:]:
            total.add_(model.chunks[index] * weight)
        chunks.append(total)
    return EncryptedModel(models[0].specs, chunks, models[0].slots)


def weighted_mean(
    models: Sequence[EncryptedModel], num_examples: Sequence[int | float]
) -> EncryptedModel:
    """Return the sample-weighted mean ``sum_k (n_k / N) * models[k]`` (FedAvg's rule).

    Raises
    ------
    ValueError
        If a count is negative or not finite, or all counts are 0.
    """
    counts = [float(n) for n in num_examples]
    for index, count in enumerate(counts):
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"num_examples[{index}] must be finite and >= 0, got {count}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("num_examples sum to 0")
    return weighted_sum(models, [count / total for count in counts])


def add(first: EncryptedModel, second: EncryptedModel) -> EncryptedModel:
    """Return ``first + second``, ciphertext by ciphertext (e.g. ``W_t + Agg``)."""
    _require_model(first, "first")
    _require_model(second, "second")
    _require_same_layout(first, second, "second")
    chunks = [a + b for a, b in zip(first.chunks, second.chunks, strict=True)]
    return EncryptedModel(first.specs, chunks, first.slots)


def add_plain(model: EncryptedModel, arrays: Mapping[str, np.ndarray]) -> EncryptedModel:
    """Return ``model + arrays`` for plaintext ``arrays`` of the same layout.

    Used once per run: the first encrypted global model is the public initial model
    plus the first encrypted aggregate.
    """
    _require_model(model, "model")
    specs = _validate_arrays(arrays)
    if [(s.key, s.shape) for s in specs] != [(s.key, s.shape) for s in model.specs]:
        raise ValueError("arrays do not have the encrypted model's keys and shapes")
    flat = _flatten(arrays, model.slots)
    chunks = [
        chunk + flat[i * model.slots : (i + 1) * model.slots]
        for i, chunk in enumerate(model.chunks)
    ]
    return EncryptedModel(model.specs, chunks, model.slots)


def ciphertext_digest(model: EncryptedModel) -> bytes:
    """Return SHA-256 over :meth:`EncryptedModel.serialize` (32 bytes).

    Anyone holding the serialised bytes (clients receive exactly these) recomputes the
    digest with ``hashlib.sha256(data).digest()``; no key is needed.
    """
    _require_model(model, "model")
    return hashlib.sha256(model.serialize()).digest()


def to_array_record(model: EncryptedModel) -> ArrayRecord:
    """Wrap a model's serialised bytes in an ``ArrayRecord`` (one ``uint8`` array)."""
    _require_model(model, "model")
    payload = np.frombuffer(model.serialize(), dtype=np.uint8)
    return ArrayRecord({ENCRYPTED_ARRAY_KEY: Array(payload)})


def is_encrypted_record(record: ArrayRecord) -> bool:
    """Return True when ``record`` carries an encrypted model (and nothing else)."""
    return list(record.keys()) == [ENCRYPTED_ARRAY_KEY]


def from_array_record(record: ArrayRecord, context: ts.Context) -> EncryptedModel:
    """Read a model written by :func:`to_array_record`.

    Raises
    ------
    ValueError
        If ``record`` is not an encrypted-model record or its bytes are malformed.
    """
    if not is_encrypted_record(record):
        raise ValueError(
            f"expected an ArrayRecord with the single key {ENCRYPTED_ARRAY_KEY!r}, "
            f"got keys {list(record.keys())}"
        )
    payload = record[ENCRYPTED_ARRAY_KEY].numpy()
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"{ENCRYPTED_ARRAY_KEY!r} must be a 1-D uint8 array")
    return EncryptedModel.deserialize(payload.tobytes(), context)


def _read(layout: struct.Struct, view: memoryview, offset: int) -> tuple[int, ...]:
    if offset + layout.size > len(view):
        raise ValueError("encrypted model is truncated")
    return layout.unpack_from(view, offset)


def _validate_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[ArraySpec, ...]:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of name to array, got {type(arrays).__name__}")
    if not arrays:
        raise ValueError("arrays is empty")
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise TypeError(f"array keys must be str, got {key!r}")
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"array {key!r} has dtype {array.dtype}; CKKS encrypts real numbers")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"array {key!r} holds non-finite values")
    return array_specs(arrays)


def _flatten(arrays: Mapping[str, np.ndarray], slots: int) -> np.ndarray:
    flat = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in arrays.values()])
    padded = np.zeros(math.ceil(flat.size / slots) * slots, dtype=np.float64)
    padded[: flat.size] = flat
    return padded


def _require_context(context: ts.Context) -> None:
    if not isinstance(context, ts.Context):
        raise TypeError(f"context must be a tenseal.Context, got {type(context).__name__}")


def _require_model(model: EncryptedModel, name: str) -> None:
    if not isinstance(model, EncryptedModel):
        raise TypeError(f"{name} must be an EncryptedModel, got {type(model).__name__}")


def _require_same_layout(reference: EncryptedModel, model: EncryptedModel, name: str) -> None:
    if model.specs != reference.specs or model.slots != reference.slots:
        raise ValueError(f"{name} has a different layout (keys, shapes, dtypes or slots)")
