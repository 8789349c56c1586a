"""Cosine screening of CKKS-encrypted updates without decrypting any of them.

Screening needs only the Gram matrix ``G_ij = <d_i, d_j>`` of the updates: norms are
its diagonal and ``cos_ij = G_ij / sqrt(G_ii G_jj)``. The server computes ``G``
homomorphically and a key holder (a committee member) decrypts only ``G``.

Scheme
    Each update ``D_k`` arrives as ``C`` fresh ciphertexts of ``S`` slots (``S = 4096``,
    ``C = 6`` for the 20.5k-parameter MNIST CNN), zero-padded. The server works on
    SEAL's ciphertexts directly (TenSEAL's ``tenseal.sealapi``), because TenSEAL's
    vector API relinearises every product and cannot rotate. For every pair ``i <= j``,
    the ``p``-th in row-major upper-triangle order, it

    1. multiplies chunk by chunk *without* relinearising, adds the ``C`` products, then
       relinearises and rescales once: ``P = sum_c D_i[c] * D_j[c]``, whose slot ``s``
       holds the partial sum over the coordinates ``s, s + S, s + 2S, ...``;
    2. sums every window of ``K`` neighbouring slots by rotate-and-add (``log2 K``
       rotations by 1, 2, ..., ``K/2``): slot ``s`` then holds ``P[s] + ... + P[s+K-1]``;
    3. keeps only the slots ``s = p mod K`` (a 0/1 plaintext mask, the second
       rescaling). Their windows tile the ring, so together they still hold all of
       ``P``.

    Then ``K`` pairs, each on its own residue class, are added into one ciphertext, and
    rotate-and-add by ``K, 2K, ..., S/2`` sums each residue class: every slot ``s``
    ends up holding exactly ``G`` of pair ``s mod K`` of that ciphertext, nothing else.

    Cost for ``n`` clients and ``m = n(n+1)/2`` pairs: ``C m`` ciphertext products
    without relinearisation, ``m`` relinearisations, ``m log2 K + ceil(m / K)
    log2(S / K)`` rotations and ``m`` mask products; the committee decrypts
    ``ceil(m / K)`` ciphertexts. For the MNIST CNN, ``n = 20`` and ``K = 16`` that is
    210 relinearisations and 952 rotations, where relinearising every product and
    summing every pair separately took 1260 and 2520: about a quarter of the time
    (``sim/bench_ckks.py``).

Soundness and leakage
    The server only sees ciphertexts under a key it does not hold. The committee
    decrypts ``G`` and nothing else: every slot of a packed ciphertext holds one whole
    Gram entry (each repeated ``S / K`` times), never a partial sum. ``G`` reveals the
    updates' norms and pairwise angles, which is exactly the input of plaintext
    screening; it does not determine any update (any rotation of all updates gives the
    same ``G``). The model is honest-but-curious with a single shared key: a server
    colluding with one client, or one that asks the committee to decrypt an arbitrary
    ciphertext, can learn more; the committee can bound that by decrypting only
    ``ceil(n(n+1) / 2K)`` ciphertexts once per round. Threshold CKKS would
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
from typing import TYPE_CHECKING, Any

import numpy as np

from bcsfl_flower.extras import import_extra
from bcsfl_flower.privacy.ckks import EncryptedModel, load_header
from bcsfl_flower.privacy.ckks_keys import load_seal, seal_bytes

if TYPE_CHECKING:  # the real modules, for annotations
    import tenseal as ts
    from tenseal import sealapi
else:
    ts = import_extra("ckks", "tenseal", "CKKS aggregation")
    sealapi = import_extra("ckks", "tenseal.sealapi", "CKKS aggregation")

_MAGIC = b"BCSFL-CKKS-GRAM\x02"
_LENGTH = struct.Struct(">Q")
_FRESH_MODULI = 3  # a product and a mask each consume one rescaling; decryption needs one
PAIRS_PER_CIPHERTEXT = 16
"""Gram entries packed into one ciphertext (``K``): fewer rotations per pair for small
``K``, fewer ciphertexts for the committee to receive and decrypt for large ``K``."""


class EncryptedGram:
    """The packed, encrypted upper triangle of a Gram matrix.

    Entry ``p`` of the row-major upper triangle (``np.triu_indices(num_models)``) is in
    ciphertext ``p // stride``, in every slot ``s`` with ``s % stride == p % stride``.

    Parameters
    ----------
    num_models : int
        Number of updates ``n``; the matrix is ``n x n``.
    stride : int
        Entries per ciphertext (``K``), a power of two no larger than the slot count.
    packed : Sequence[sealapi.Ciphertext]
        ``ceil(n(n+1) / 2K)`` SEAL ciphertexts holding the entries in order.
    """

    def __init__(self, num_models: int, stride: int, packed: Sequence[Any]) -> None:
        self.num_models = int(num_models)
        self.stride = int(stride)
        self.packed = list(packed)
        if self.num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        if self.stride < 1 or self.stride & (self.stride - 1):
            raise ValueError(f"stride must be a power of two, got {stride}")
        if len(self.packed) != math.ceil(self.num_entries / self.stride):
            raise ValueError(
                f"{self.num_models} models need {self.num_entries} Gram entries, i.e. "
                f"{math.ceil(self.num_entries / self.stride)} ciphertexts of {self.stride}; "
                f"got {len(self.packed)}"
            )

    @property
    def num_entries(self) -> int:
        """Number of distinct entries, ``n(n+1)/2``."""
        return self.num_models * (self.num_models + 1) // 2

    def serialize(self) -> bytes:
        """Return the magic bytes, a JSON header, then length-prefixed SEAL ciphertexts."""
        header = json.dumps(
            {"num_models": self.num_models, "stride": self.stride, "packed": len(self.packed)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        parts = [_MAGIC, _LENGTH.pack(len(header)), header]
        for ciphertext in self.packed:
            data = seal_bytes(ciphertext)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)

    @classmethod
    def deserialize(cls, data: bytes, context: ts.Context) -> EncryptedGram:
        """Rebuild from :meth:`serialize` bytes, for ``context``'s parameters."""
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if not data.startswith(_MAGIC):
            raise ValueError("not a serialised encrypted Gram matrix (bad magic bytes)")
        fields, offset = _split(data, len(_MAGIC))
        try:
            header = load_header(fields[0], max_depth=1)
            num_models, stride = int(header["num_models"]), int(header["stride"])
            count = int(header["packed"])
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ValueError(f"encrypted Gram matrix has a malformed header: {error}") from error
        if len(fields) != count + 1 or offset != len(data):
            raise ValueError("encrypted Gram matrix is truncated or has trailing bytes")
        seal_context = context.seal_context().data
        try:
            packed = [load_seal(sealapi.Ciphertext(), seal_context, f) for f in fields[1:]]
        except Exception as error:  # SEAL raises bare C++ errors on bad input
            raise ValueError(f"encrypted Gram ciphertext does not deserialise: {error}") from error
        return cls(num_models, stride, packed)


def encrypted_gram(
    updates: Sequence[EncryptedModel], pairs_per_ciphertext: int = PAIRS_PER_CIPHERTEXT
) -> EncryptedGram:
    """Compute the Gram matrix of encrypted updates homomorphically.

    Needs only the public context (relinearisation and Galois keys) the updates are
    linked to. See the module docstring for the scheme.

    Parameters
    ----------
    updates : Sequence[EncryptedModel]
        Fresh encryptions (two rescalings left) of the updates ``d_k = w_k - w_t``,
        all of the same layout.
    pairs_per_ciphertext : int (default: :data:`PAIRS_PER_CIPHERTEXT`)
        Gram entries per packed ciphertext, a power of two; capped at the slot count.

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
    updates = _check_fresh(updates)
    slots = updates[0].slots
    if (
        isinstance(pairs_per_ciphertext, bool)
        or not isinstance(pairs_per_ciphertext, int)
        or pairs_per_ciphertext < 1
        or pairs_per_ciphertext & (pairs_per_ciphertext - 1)
    ):
        raise ValueError(
            f"pairs_per_ciphertext must be a power of two, got {pairs_per_ciphertext!r}"
        )
    stride = min(pairs_per_ciphertext, slots)
    evaluator = _GramEvaluator(updates[0].chunks[0].context(), slots, stride)
    chunks = [[chunk.ciphertext()[0] for chunk in update.chunks] for update in updates]
    pairs = list(zip(*np.triu_indices(len(updates)), strict=True))
    packed = []
    for start in range(0, len(pairs), stride):
        residues = []
        for residue, (i, j) in enumerate(pairs[start : start + stride]):
            residues.append(evaluator.masked_window_sums(chunks[i], chunks[j], residue))
        packed.append(evaluator.sum_residues(residues))
    return EncryptedGram(len(updates), stride, packed)


class _GramEvaluator:
    """SEAL operations of :func:`encrypted_gram`, with the round's keys and masks."""

    def __init__(self, context: ts.Context, slots: int, stride: int) -> None:
        seal_context = context.seal_context().data
        self._evaluator = sealapi.Evaluator(seal_context)
        self._encoder = sealapi.CKKSEncoder(seal_context)
        self._relin_keys = context.relin_keys().data
        self._galois_keys = context.galois_keys().data
        self._scale = context.global_scale
        self._slots = slots
        self._stride = stride
        self._masks: dict[int, object] = {}

    def masked_window_sums(self, left: list[object], right: list[object], residue: int) -> object:
        """Return steps 1-3 for one pair: its product, window sums and residue slots."""
        products = []
        for a, b in zip(left, right, strict=True):
            product = sealapi.Ciphertext()
            self._evaluator.multiply(a, b, product)
            products.append(product)
        total = sealapi.Ciphertext()
        self._evaluator.add_many(products, total)
        self._evaluator.relinearize_inplace(total, self._relin_keys)
        self._evaluator.rescale_to_next_inplace(total)
        self._rotate_and_add(total, 1, self._stride)
        self._evaluator.multiply_plain_inplace(total, self._mask(residue, total.parms_id()))
        self._evaluator.rescale_to_next_inplace(total)
        return total

    def sum_residues(self, residues: list[object]) -> object:
        """Add one ciphertext per residue and sum every residue class over the ring."""
        packed = sealapi.Ciphertext()
        self._evaluator.add_many(residues, packed)
        self._rotate_and_add(packed, self._stride, self._slots)
        return packed

    def _rotate_and_add(self, ciphertext: object, first: int, stop: int) -> None:
        """Add to ``ciphertext`` its rotations by ``first, 2 first, ...`` below ``stop``."""
        step = first
        while step < stop:
            rotated = sealapi.Ciphertext()
            self._evaluator.rotate_vector(ciphertext, step, self._galois_keys, rotated)
            self._evaluator.add_inplace(ciphertext, rotated)
            step *= 2

    def _mask(self, residue: int, parms_id: object) -> object:
        """Return (cached) the 0/1 plaintext of the slots ``s = residue mod stride``."""
        if residue not in self._masks:
            values = np.zeros(self._slots)
            values[residue :: self._stride] = 1.0
            plaintext = sealapi.Plaintext()
            self._encoder.encode(values.tolist(), parms_id, self._scale, plaintext)
            self._masks[residue] = plaintext
        return self._masks[residue]


def _check_fresh(updates: Sequence[EncryptedModel]) -> list[EncryptedModel]:
    """Return the updates as a list after checking they can enter a Gram computation."""
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
    return updates


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
    seal_context = secret_context.seal_context().data
    decryptor = sealapi.Decryptor(seal_context, secret_context.secret_key().data)
    encoder = sealapi.CKKSEncoder(seal_context)
    values = []
    for ciphertext in gram.packed:
        plaintext = sealapi.Plaintext()
        decryptor.decrypt(ciphertext, plaintext)
        values.append(np.asarray(encoder.decode_double(plaintext)[: gram.stride]))
    entries = np.concatenate(values)[: gram.num_entries].astype(np.float64)
    matrix = np.zeros((gram.num_models, gram.num_models), dtype=np.float64)
    rows, columns = np.triu_indices(gram.num_models)
    matrix[rows, columns] = entries
    matrix[columns, rows] = entries
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
