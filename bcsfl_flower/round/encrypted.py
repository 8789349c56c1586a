"""Encrypted updates: the server's half of a CKKS round, with a public context only.

In CKKS mode the clients (through :mod:`bcsfl_flower.client.ckks_mod`) send encrypted
updates ``D_k = Enc(w_k - w_t)``. :class:`EncryptedSpace` gives the round pipeline the
same two things :class:`~bcsfl_flower.round.plain.PlainSpace` gives it, and never holds
a secret key (every function that receives a TenSEAL context refuses one that
:meth:`~tenseal.Context.is_private`):

* the **Gram matrix**: computed homomorphically
  (:func:`~bcsfl_flower.privacy.encrypted_screening.encrypted_gram`), then decrypted by a
  stake-drawn committee of key holders (:func:`decrypt_gram_by_committee`); the matrix
  that ``ceil(2m/3)`` of the ``m`` members return identically is used. Bounds,
  screening and every candidate are computed from it exactly as in plaintext;
* **candidates**: ``W_t + sum_k a_k D_k`` on ciphertexts, one plaintext-scalar product
  per update (:func:`~bcsfl_flower.privacy.ckks.weighted_sum`).

Before the first round the space fetches the public context from one client
(:func:`fetch_public_context`); in a deployment the ServerApp can load the key
ceremony's public file with :func:`~bcsfl_flower.privacy.ckks_keys.load_public_context`.

Levels
    A fresh update has three moduli (for the default
    :class:`~bcsfl_flower.privacy.ckks_keys.CKKSParams`). A candidate multiplies each
    ciphertext by a plaintext scalar and rescales once, to two moduli; every round drops
    the *same* prime, so every aggregate has the same level and scale. Adding
    ciphertexts consumes no level, so ``W_t`` stays at two moduli however many rounds it
    accumulates, and its noise grows only additively (measured: decryption error below
    ``2e-7`` after 20 rounds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.committee import quorum_size
from bcsfl_flower.extras import import_extra
from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    ArraySpec,
    EncryptedModel,
    add,
    add_plain,
    array_specs,
    from_array_record,
    is_encrypted_record,
    to_array_record,
    weighted_sum,
)
from bcsfl_flower.privacy.ckks_keys import load_public_context, slot_count
from bcsfl_flower.privacy.encrypted_screening import EncryptedGram, encrypted_gram
from bcsfl_flower.protocol import (
    CKKS_CONFIG_KEY,
    GRAM_MESSAGE_TYPE,
    PUBLIC_MESSAGE_TYPE,
    ConfigValue,
    gram_request,
    read_gram_reply,
    read_public_context,
)
from bcsfl_flower.round.space import GramExchange, UpdateCollector, UpdateSpace
from bcsfl_flower.round.state import GramResult, UpdateBatch

if TYPE_CHECKING:  # the real modules, for annotations
    import tenseal as ts
else:
    ts = import_extra("ckks", "tenseal", "CKKS aggregation")


def fetch_public_context(grid: Grid, node_id: int, timeout: float) -> ts.Context:
    """Ask one client for the CKKS public context and load it.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    node_id : int
        A node running :func:`~bcsfl_flower.client.ckks_mod.ckks_mod`.
    timeout : float
        Seconds to wait; the reply is about 9.5 MB.

    Returns
    -------
    ts.Context
        A public context (``is_private()`` is False) with relinearisation and Galois
        keys.

    Raises
    ------
    RuntimeError
        If the node does not answer, answers with an error, or sends bytes that are
        not a public context (:func:`load_public_context` refuses a secret one).
    """
    message = Message(
        content=RecordDict(), dst_node_id=int(node_id), message_type=PUBLIC_MESSAGE_TYPE
    )
    replies = list(grid.send_and_receive([message], timeout=timeout))
    if not replies:
        raise RuntimeError(f"node {node_id} sent no CKKS public context within {timeout} s")
    try:
        context = load_public_context(read_public_context(replies[0]))
    except ValueError as err:
        raise RuntimeError(f"node {node_id} sent no usable CKKS public context: {err}") from err
    log(INFO, "ckks: loaded the public context from node %s", node_id)
    return context


def global_specs(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> tuple[ArraySpec, ...]:
    """Return the specs of a plaintext global model, in record order.

    Clients encrypt their updates in the order of the global model they receive, so
    these are the specs every encrypted update (and every ``W_t``) must carry.
    """
    return array_specs(_plain(arrays))


def check_encrypted_reply(
    arrays: ArrayRecord, specs: Sequence[ArraySpec], public_ctx: ts.Context
) -> EncryptedModel | str:
    """Check one encrypted update and deserialise it; return the model or a reason.

    Rejects, each with its own reason: a record that is not exactly one 1-D ``uint8``
    array under :data:`~bcsfl_flower.privacy.ckks.ENCRYPTED_ARRAY_KEY`; bytes that do
    not deserialise under ``public_ctx`` (including a ciphertext count that does not
    fit the declared arrays); specs (keys, dtypes, shapes) that differ from the global
    model's; a slot count other than the context's; and ciphertexts that are not fresh
    (not two polynomials at the first level and the context's scale), since
    :func:`~bcsfl_flower.privacy.encrypted_screening.encrypted_gram` needs two
    rescalings and adding an update of another scale would fail.

    Parameters
    ----------
    arrays : ArrayRecord
        The reply's ArrayRecord.
    specs : Sequence[ArraySpec]
        The global model's specs, from :func:`global_specs`.
    public_ctx : ts.Context
        The server's public context.

    Raises
    ------
    ValueError
        If ``public_ctx`` holds a secret key.
    """
    _require_public(public_ctx)
    keys = list(arrays.keys())
    if keys != [ENCRYPTED_ARRAY_KEY]:
        return f"expected one encrypted array {ENCRYPTED_ARRAY_KEY!r}, got keys {keys}"
    array = arrays[ENCRYPTED_ARRAY_KEY]
    if array.dtype != "uint8" or len(array.shape) != 1:
        return (
            f"{ENCRYPTED_ARRAY_KEY!r} must be a 1-D uint8 array, got {array.dtype}"
            f"{list(array.shape)}"
        )
    try:
        model = from_array_record(arrays, public_ctx)
    except Exception as err:  # untrusted bytes: whatever they make a decoder raise
        # Besides ValueError and TypeError, a client's bytes can make the decoders raise
        # EOFError (np.load of an empty payload), ZeroDivisionError (a header with
        # "slots": 0) or RecursionError (a deeply nested JSON header).
        return f"encrypted update does not deserialise: {err!r}"
    if model.specs != tuple(specs):
        return "encrypted update's keys, shapes or dtypes differ from the global model's"
    slots = slot_count(public_ctx)
    if model.slots != slots:
        return f"encrypted update has {model.slots} slots per ciphertext, expected {slots}"
    fresh = _fresh_moduli(public_ctx)
    for index, chunk in enumerate(model.chunks):
        ciphertext = chunk.ciphertext()[0]
        if ciphertext.size() != 2 or ciphertext.coeff_modulus_size() != fresh:
            return (
                f"ciphertext {index} is not fresh ({ciphertext.size()} polynomials, "
                f"{ciphertext.coeff_modulus_size()} moduli; expected 2 and {fresh})"
            )
        if not math.isclose(ciphertext.scale, public_ctx.global_scale, rel_tol=1e-9):
            return (
                f"ciphertext {index} has scale 2^{math.log2(ciphertext.scale):.2f}, expected "
                f"2^{math.log2(public_ctx.global_scale):.2f}"
            )
    return model


@dataclass(frozen=True)
class EncryptedBatch(UpdateBatch):
    """A round's accepted encrypted updates, in row order."""

    models: tuple[EncryptedModel, ...]

    @property
    def size(self) -> int:
        """Number of updates."""
        return len(self.models)


class EncryptedCollector(UpdateCollector[EncryptedBatch]):
    """Check encrypted replies against the global model's layout (:func:`check_encrypted_reply`)."""

    def __init__(self, specs: Sequence[ArraySpec], public_ctx: ts.Context) -> None:
        _require_public(public_ctx)
        self.specs = tuple(specs)
        self.public_ctx = public_ctx
        self._models: list[EncryptedModel] = []

    def add(self, arrays: ArrayRecord) -> str | None:
        """Deserialise and check one encrypted update; return a fault or None."""
        model = check_encrypted_reply(arrays, self.specs, self.public_ctx)
        if isinstance(model, str):
            return model
        self._models.append(model)
        return None

    def finish(self) -> EncryptedBatch:
        """Return every update kept."""
        return EncryptedBatch(tuple(self._models))


class EncryptedSpace(UpdateSpace[EncryptedBatch]):
    """CKKS-encrypted updates: the server sees ciphertexts and one decrypted Gram matrix."""

    name = "ckks"

    def __init__(self) -> None:
        self.public_ctx: ts.Context | None = None
        self.specs: tuple[ArraySpec, ...] = ()

    def prepare(self, grid: Grid, initial_arrays: ArrayRecord, timeout: float) -> None:
        """Fetch the public context from a client and fix the model's layout (once).

        The first model is plaintext in a new run and a ciphertext in a resumed one;
        either way it fixes the keys, shapes and dtypes every update must have.
        """
        if self.public_ctx is not None:
            return
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise RuntimeError("CKKS mode: no node to fetch the public context from")
        self.public_ctx = fetch_public_context(grid, node_ids[0], timeout)
        if is_encrypted_record(initial_arrays):
            self.specs = from_array_record(initial_arrays, self.public_ctx).specs
        else:
            self.specs = global_specs(initial_arrays)

    def message_config(self) -> Mapping[str, ConfigValue]:
        """Tell the clients' CKKS mod to decrypt models and encrypt updates."""
        return {CKKS_CONFIG_KEY: True}

    def collector(self, global_arrays: ArrayRecord, capacity: int) -> EncryptedCollector:
        """Return a collector for this round's encrypted replies."""
        return EncryptedCollector(self.specs, self._context())

    def gram(self, batch: EncryptedBatch, exchange: GramExchange) -> GramResult:
        """Compute the Gram homomorphically and have stake-drawn key holders decrypt it."""
        keyholders = exchange.draw_keyholders()
        matrix, record = decrypt_gram_by_committee(
            exchange.grid,
            [int(node) for node in keyholders],
            encrypted_gram(list(batch.models)),
            exchange.timeout,
            server_round=exchange.server_round,
        )
        return GramResult(matrix, record["reason"], record)

    def combine(
        self, global_arrays: ArrayRecord, batch: EncryptedBatch, coefficients: np.ndarray
    ) -> tuple[ArrayRecord, ...]:
        """Return ``W_t + sum_k a_k D_k`` on ciphertexts, for every row ``a``.

        A row of zeros (every update clipped to nothing) is ``W_t`` itself.
        """
        context = self._context()
        previous: Any = (
            from_array_record(global_arrays, context)
            if is_encrypted_record(global_arrays)
            else global_arrays
        )
        return tuple(
            to_array_record(encrypted_step(previous, list(batch.models), row))
            if np.any(row)
            else global_arrays
            for row in np.atleast_2d(coefficients)
        )

    def _context(self) -> ts.Context:
        if self.public_ctx is None:
            raise RuntimeError("the CKKS space has no public context; prepare() it first")
        return self.public_ctx


def encrypted_step(
    previous: EncryptedModel | ArrayRecord | Mapping[str, np.ndarray],
    updates: Sequence[EncryptedModel],
    coefficients: Sequence[float],
) -> EncryptedModel:
    """Return ``W_t + sum_k coefficients[k] D_k``, computed on ciphertexts.

    Parameters
    ----------
    previous : EncryptedModel | ArrayRecord | Mapping[str, np.ndarray]
        ``W_t``: the encrypted global model, or the plaintext initial model ``w_0``
        while no encrypted round has committed yet (then ``add_plain`` is used).
    updates : Sequence[EncryptedModel]
        The round's encrypted updates.
    coefficients : Sequence[float]
        Their weights (clipping included); updates with weight 0 are left out.

    Raises
    ------
    ValueError
        If there are no updates, every weight is 0, a plaintext ``previous`` has other
        specs than the updates, or the layouts differ.
    """
    if not updates:
        raise ValueError("encrypted_step needs at least one update")
    step = weighted_sum(updates, coefficients)
    if isinstance(previous, EncryptedModel):
        return add(previous, step)
    plain = _plain(previous)
    if array_specs(plain) != step.specs:
        raise ValueError(
            "the plaintext global model's keys, shapes or dtypes differ from the updates'"
        )
    return add_plain(step, plain)


def decrypt_gram_by_committee(
    grid: Grid,
    committee_node_ids: Sequence[int],
    enc_gram: EncryptedGram,
    timeout: float,
    *,
    server_round: int,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Have key holders decrypt the packed Gram matrix; keep the 2/3-identical answer.

    Each member receives the same serialised ciphertext as ``query.bcsfl_ckks_gram``.
    Honest members share the key and decryption is deterministic, so they return
    bit-identical matrices; a matrix is accepted when at least
    ``quorum_size(len(committee))`` members returned it (same SHA-256). Members that
    are silent, fail, or send a malformed answer count against every matrix, as in
    :mod:`bcsfl_flower.round.consensus`.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    committee_node_ids : Sequence[int]
        Distinct node ids of the key holders asked to decrypt.
    enc_gram : EncryptedGram
        From :func:`~bcsfl_flower.privacy.encrypted_screening.encrypted_gram`.
    timeout : float
        Seconds to wait for the committee.
    server_round : int
        The current round; a member decrypts one Gram per round.

    Returns
    -------
    tuple[np.ndarray | None, dict[str, Any]]
        The accepted ``(n, n)`` matrix or None, and a JSON-serialisable record:
        ``committee``, ``quorum``, ``answers`` (node id -> digest), ``problems``
        (node id -> reason, including ``"no reply"``), ``digest`` (accepted, or None)
        and ``reason``.
    """
    committee = [int(node) for node in committee_node_ids]
    if not committee:
        raise ValueError("committee_node_ids is empty: nobody can decrypt the Gram matrix")
    if len(set(committee)) != len(committee):
        raise ValueError(f"committee_node_ids has duplicates: {committee}")
    if not isinstance(enc_gram, EncryptedGram):
        raise TypeError(f"enc_gram must be an EncryptedGram, got {type(enc_gram).__name__}")
    quorum = quorum_size(len(committee))
    data = enc_gram.serialize()
    messages = [
        Message(
            content=gram_request(data, server_round),
            dst_node_id=node,
            message_type=GRAM_MESSAGE_TYPE,
        )
        for node in committee
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))

    sent = {
        message.metadata.message_id: node for message, node in zip(messages, committee, strict=True)
    }
    matrices: dict[str, np.ndarray] = {}
    answers: dict[str, str] = {}
    problems: dict[str, str] = {}
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id)
        if node is None or str(node) in answers or str(node) in problems:
            log(WARNING, "ckks: ignoring an unexpected or repeated Gram reply")
            continue
        outcome = read_gram_reply(reply, enc_gram.num_models)
        if isinstance(outcome, str):
            problems[str(node)] = outcome
            continue
        matrix, digest = outcome
        matrices.setdefault(digest, matrix)
        answers[str(node)] = digest
    for node in committee:
        if str(node) not in answers and str(node) not in problems:
            problems[str(node)] = "no reply"

    counts = Counter(answers.values())
    leader, votes = max(counts.items(), key=lambda item: (item[1], item[0]), default=(None, 0))
    accepted = leader is not None and votes >= quorum
    if accepted:
        reason = f"{votes}/{len(committee)} members returned the same Gram matrix, quorum {quorum}"
    else:
        reason = (
            f"no Gram matrix reached quorum {quorum} of {len(committee)} members "
            f"(largest agreement {votes}, {len(problems)} without a usable answer)"
        )
    log(INFO if accepted else WARNING, "ckks: %s", reason)
    record = {
        "committee": [str(node) for node in committee],
        "quorum": quorum,
        "answers": answers,
        "problems": problems,
        "digest": leader if accepted else None,
        "reason": reason,
    }
    return (matrices[leader] if accepted and leader is not None else None), record


def _plain(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(arrays, ArrayRecord):
        return {key: array.numpy() for key, array in arrays.items()}
    if isinstance(arrays, Mapping):
        return {key: np.asarray(value) for key, value in arrays.items()}
    raise TypeError(f"expected an ArrayRecord or a mapping of arrays, got {type(arrays).__name__}")


def _require_public(context: ts.Context) -> None:
    if not isinstance(context, ts.Context):
        raise TypeError(f"public_ctx must be a tenseal.Context, got {type(context).__name__}")
    if context.is_private():
        raise ValueError("the server's context holds a secret key; it must only hold a public one")


def _fresh_moduli(context: ts.Context) -> int:
    return len(context.seal_context().data.first_context_data().parms().coeff_modulus())
