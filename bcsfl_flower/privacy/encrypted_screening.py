"""Cosine screening of CKKS-encrypted updates without decrypting any of them.

Screening needs only the Gram matrix ``G_ij = <d_i, d_j>`` of the updates: norms are
its diagonal and ``cos_ij = G_ij / sqrt(G_ii G_jj)``. The server computes ``G``
homomorphically and a key holder (a committee member) decrypts only ``G``.

Scheme
    Each update ``D_k`` arrives as ``C`` fresh ciphertexts of ``S`` slots (``S = 4096``,
    ``C = 6`` for the 20.5k-parameter MNIST CNN), zero-padded. For every pair
    ``i <= j`` the server

    1. multiplies chunk by chunk and adds: ``P = sum_c D_i[c] * D_j[c]``
       (``C`` ciphertext-ciphertext products with relinearisation and one rescaling,
       ``C - 1`` additions): slot ``s`` of ``P`` holds the partial sum over the
       coordinates ``s, s + S, s + 2S, ...``;
    2. sums ``P``'s slots by rotate-and-add (``log2 S = 12`` rotations with the public
       Galois keys). The ciphertexts are full (``S`` values each), so the rotations
       wrap around all slots and leave ``G_ij`` in *every* slot: nothing but the
       scalar is left to decrypt;
    3. packs all ``n(n+1)/2`` scalars into as few ciphertexts as possible (TenSEAL's
       ``pack_vectors``: one plaintext mask product each, the second rescaling),
       so the committee decrypts one ciphertext of about 130 kB instead of
       ``n(n+1)/2`` ciphertexts of about 235 kB.

    Cost for ``n`` clients: ``C n(n+1)/2`` ciphertext-ciphertext multiplications,
    ``12 n(n+1)/2`` rotations, ``n(n+1)/2`` plaintext multiplications, and a single
    decryption per 4096 Gram entries. For the MNIST CNN and ``n = 20`` that is 1260
    multiplications and 2520 rotations. Summing every chunk separately (TenSEAL's
    ``dot``) would need ``12 C`` rotations per pair, six times as many.

Soundness and leakage
    The server only sees ciphertexts under a key it does not hold. The committee
    decrypts ``G`` and nothing else: the packed ciphertext's slots hold only Gram
    entries (unmasked slots are 0, masked ones repeat entries). ``G`` reveals the
    updates' norms and pairwise angles, which is exactly the input of plaintext
    screening; it does not determine any update (any rotation of all updates gives the
    same ``G``). The model is honest-but-curious with a single shared key: a server
    colluding with one client, or one that asks the committee to decrypt an arbitrary
    ciphertext, can learn more; the committee can bound that by decrypting only
    ciphertexts of exactly ``n(n+1)/2`` entries once per round. Threshold CKKS would
    remove the shared key, but TenSEAL does not implement it.

    CKKS is approximate: each Gram entry carries an absolute error around ``1e-6``
    for the default parameters, far below the spread of cosines that screening
    thresholds (``tau`` of 0.5-0.7) act on, unless updates are so small that their
    squared norms approach that error.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence

import numpy as np

from bcsfl_flower.extras import import_extra
from bcsfl_flower.privacy.ckks import EncryptedModel, load_header

ts = import_extra("ckks", "tenseal", "CKKS aggregation")

_MAGIC = b"BCSFL-CKKS-GRAM\x01"
_LENGTH = struct.Struct(">Q")
_FRESH_MODULI = 3  # a product and a mask each consume one rescaling; decryption needs one


class EncryptedGram:
    """The packed, encrypted upper triangle of a Gram matrix.

    Entry ``(i, j)`` with ``i <= j`` is at position ``p`` of the row-major upper
    triangle (``np.triu_indices(num_models)``), i.e. slot ``p % slots`` of ciphertext
    ``p // slots``.

    Parameters
    ----------
    num_models : int
        Number of updates ``n``; the matrix is ``n x n``.
    packed : Sequence[ts.CKKSVector]
        Ciphertexts holding the ``n(n+1)/2`` entries in order.
    """

    def __init__(self, num_models: int, packed: Sequence[ts.CKKSVector]) -> None:
        self.num_models = int(num_models)
        self.packed = list(packed)
        if self.num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        sizes = sum(vector.size() for vector in self.packed)
        if sizes != self.num_entries:
            raise ValueError(
                f"{self.num_models} models need {self.num_entries} Gram entries, "
                f"the ciphertexts hold {sizes}"
            )

    @property
    def num_entries(self) -> int:
        """Number of distinct entries, ``n(n+1)/2``."""
        return self.num_models * (self.num_models + 1) // 2

    def serialize(self) -> bytes:
        """Return the magic bytes, a JSON header, then length-prefixed ciphertexts."""
        header = json.dumps(
            {"num_models": self.num_models, "packed": len(self.packed)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        parts = [_MAGIC, _LENGTH.pack(len(header)), header]
        for vector in self.packed:
            data = vector.serialize()
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)

    @classmethod
    def deserialize(cls, data: bytes, context: ts.Context) -> EncryptedGram:
        """Rebuild from :meth:`serialize` bytes, linked to ``context``."""
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data.startswith(_MAGIC):
            raise ValueError("not a serialised encrypted Gram matrix (bad magic bytes)")
        fields, offset = _split(data, len(_MAGIC))
        try:
            header = load_header(fields[0], max_depth=1)
            num_models, count = int(header["num_models"]), int(header["packed"])
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"encrypted Gram matrix has a malformed header: {error}") from error
        if len(fields) != count + 1 or offset != len(data):
            raise ValueError("encrypted Gram matrix is truncated or has trailing bytes")
        try:
            packed = [ts.ckks_vector_from(context, field) for field in fields[1:]]
        except Exception as error:  # TenSEAL raises bare C++ errors on bad input
            raise ValueError(f"encrypted Gram ciphertext does not deserialise: {error}") from error
        return cls(num_models, packed)


def encrypted_gram(
    updates: Sequence[EncryptedModel], pack_size: int | None = None
) -> EncryptedGram:
    """Compute the Gram matrix of encrypted updates homomorphically.

    Needs only the public context (relinearisation and Galois keys) the updates are
    linked to.

    Parameters
    ----------
    updates : Sequence[EncryptedModel]
        Fresh encryptions (two rescalings left) of the updates ``d_k = w_k - w_t``,
        all of the same layout.
    pack_size : int, optional
        Gram entries per packed ciphertext; defaults to the slot count (4096), the
        fewest ciphertexts. A smaller value splits the matrix so that several
        committee members can each decrypt a part.

    Returns
    -------
    EncryptedGram
        The packed upper triangle; give it to a key holder for :func:`decrypt_gram`.

    Raises
    ------
    ValueError
        If there are no updates, they differ in layout, or a ciphertext has already
        been multiplied (not enough rescalings left).
    """
    updates = list(updates)
    if not updates:
        raise ValueError("encrypted_gram needs at least one update")
    for index, update in enumerate(updates):
        if not isinstance(update, EncryptedModel):
            raise TypeError(
                f"updates[{index}] must be an EncryptedModel, got {type(update).__name__}"
            )
        if update.specs != updates[0].specs or update.slots != updates[0].slots:
            raise ValueError(f"updates[{index}] has a different layout from updates[0]")
        moduli = update.chunks[0].ciphertext()[0].coeff_modulus_size()
        if moduli < _FRESH_MODULI:
            raise ValueError(
                f"updates[{index}] has {moduli} moduli left, encrypted screening needs "
                f"{_FRESH_MODULI}: pass the clients' fresh ciphertexts, not aggregates"
            )
    slots = updates[0].slots
    if pack_size is None:
        pack_size = slots
    if isinstance(pack_size, bool) or not isinstance(pack_size, int) or not 1 <= pack_size <= slots:
        raise ValueError(f"pack_size must be an int in [1, {slots}], got {pack_size!r}")
    entries = []
    for i, j in zip(*np.triu_indices(len(updates)), strict=True):
        left, right = updates[i].chunks, updates[j].chunks
        product = left[0] * right[0]
        for a, b in zip(left[1:], right[1:], strict=True):
            product.add_(a * b)
        entries.append(product.sum())
    packed = [
        ts.CKKSVector.pack_vectors(entries[start : start + pack_size])
        for start in range(0, len(entries), pack_size)
    ]
    return EncryptedGram(len(updates), packed)


def decrypt_gram(gram: EncryptedGram, secret_context: ts.Context) -> np.ndarray:
    """Decrypt an encrypted Gram matrix (committee side).

    Returns
    -------
    np.ndarray
        The symmetric ``(n, n)`` float64 Gram matrix.

    Raises
    ------
    ValueError
        If ``secret_context`` holds no secret key.
    """
    if not isinstance(gram, EncryptedGram):
        raise TypeError(f"gram must be an EncryptedGram, got {type(gram).__name__}")
    if not isinstance(secret_context, ts.Context):
        raise TypeError(
            f"secret_context must be a tenseal.Context, got {type(secret_context).__name__}"
        )
    if not secret_context.is_private():
        raise ValueError("secret_context holds no secret key and cannot decrypt")
    secret_key = secret_context.secret_key()
    values = np.concatenate(
        [np.asarray(vector.decrypt(secret_key), dtype=np.float64) for vector in gram.packed]
    )
    matrix = np.zeros((gram.num_models, gram.num_models), dtype=np.float64)
    rows, columns = np.triu_indices(gram.num_models)
    matrix[rows, columns] = values
    matrix[columns, rows] = values
    return matrix


def gram_to_cosine(gram: np.ndarray, zero_tolerance: float = 1e-6) -> np.ndarray:
    """Turn a Gram matrix into cosine similarities, guarding zero and noisy norms.

    An update without direction gets similarity 0 with everyone and 1 with itself, and
    the result is clipped to ``[-1, 1]``. Because a decrypted Gram matrix is
    approximate, a squared norm at most ``zero_tolerance`` times the largest one
    counts as zero (CKKS noise can even make it slightly negative).

    Parameters
    ----------
    gram : np.ndarray
        Symmetric ``(n, n)`` matrix of inner products.
    zero_tolerance : float (default: 1e-6)
        Relative threshold below which a squared norm is treated as zero.

    Returns
    -------
    np.ndarray
        float64 ``(n, n)`` cosine similarities.
    """
    matrix = np.asarray(gram, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("gram contains non-finite values")
    if not math.isfinite(zero_tolerance) or zero_tolerance < 0:
        raise ValueError(f"zero_tolerance must be finite and >= 0, got {zero_tolerance}")
    matrix = 0.5 * (matrix + matrix.T)
    squared = np.diag(matrix).copy()
    scale = squared.max(initial=0.0)
    squared[squared <= zero_tolerance * scale] = 0.0
    norms = np.sqrt(squared)
    denominator = np.outer(norms, norms)
    cosine = np.zeros_like(matrix)
    np.divide(matrix, denominator, out=cosine, where=denominator > 0)
    np.clip(cosine, -1.0, 1.0, out=cosine)
    np.fill_diagonal(cosine, 1.0)
    return cosine


def _split(data: bytes, offset: int) -> tuple[list[bytes], int]:
    """Split length-prefixed fields from ``offset`` to the end of ``data``."""
    fields = []
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise ValueError("encrypted Gram matrix is truncated")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise ValueError("encrypted Gram matrix is truncated")
        fields.append(data[offset : offset + length])
        offset += length
    return fields, offset
