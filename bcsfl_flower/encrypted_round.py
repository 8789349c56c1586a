"""The server's half of a CKKS round, with a public context only.

In CKKS mode the clients (through :mod:`bcsfl_flower.client.ckks_mod`) send encrypted
updates ``D_k = Enc(w_k - w_t)``. This module does what the strategy needs with them,
in this order, and never holds a secret key: every function that receives a TenSEAL
context refuses one that :meth:`~tenseal.Context.is_private`.

1. :func:`fetch_public_context` once at start: ask one client for the public context
   (public key, relinearisation and Galois keys). In a deployment the ServerApp can
   load the key ceremony's public file with
   :func:`~bcsfl_flower.privacy.ckks_keys.load_public_context` instead.
2. :class:`EncryptedReplyChecker` checks each train reply on its own, like
   :class:`~bcsfl_flower.replies.ReplyChecker` does for plaintext ones: one
   ciphertext record of the global model's layout (:func:`check_encrypted_reply`), and
   a finite, positive ``num-examples``.
3. :func:`~bcsfl_flower.privacy.encrypted_screening.encrypted_gram` of the accepted
   updates, then :func:`decrypt_gram_by_committee`: key holders decrypt only that
   packed Gram matrix, and the matrix that ``ceil(2m/3)`` of the ``m`` members return
   identically is used.
4. :func:`screen_encrypted` turns it into cosine similarities and norms for
   :func:`~bcsfl_flower.screening.screen_updates`.
5. :func:`encrypted_global` computes ``W_{t+1} = W_t + sum_k (n_k / N) D_k`` over the
   trusted updates; :func:`~bcsfl_flower.privacy.ckks.to_array_record` is the
   candidate to validate, mine and anchor.

Levels
    A fresh update has three moduli (for the default
    :class:`~bcsfl_flower.privacy.ckks_keys.CKKSParams`). The weighted mean multiplies
    each ciphertext by a plaintext scalar and rescales once, to two moduli at scale
    ``2**80 / q`` for the dropped prime ``q``; every round drops the *same* prime, so
    every aggregate has the same level and scale. Adding ciphertexts consumes no level,
    so ``W_t`` stays at two moduli however many rounds it accumulates, and its noise
    grows only additively (measured: decryption error below ``2e-7`` after 20 rounds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import tenseal as ts
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.client.ckks_mod import (
    GRAM_MESSAGE_TYPE,
    PUBLIC_MESSAGE_TYPE,
    gram_request,
    public_context_bytes,
    read_gram_reply,
)
from bcsfl_flower.consensus import quorum_size
from bcsfl_flower.privacy.ckks import (
    ENCRYPTED_ARRAY_KEY,
    ArraySpec,
    EncryptedModel,
    add,
    add_plain,
    array_specs,
    from_array_record,
    weighted_mean,
)
from bcsfl_flower.privacy.ckks_keys import load_public_context, slot_count
from bcsfl_flower.privacy.encrypted_screening import EncryptedGram, gram_to_cosine
from bcsfl_flower.replies import RejectedReply, example_weight, split_replies
from bcsfl_flower.screening import MIN_CENTERED_UPDATES

GRAM_CENTERINGS = ("none", "mean")
"""Centrings :func:`screen_encrypted` can apply to a Gram matrix alone. The plaintext
path's ``"median"`` needs the updates themselves, which the server never sees."""


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
        context = load_public_context(public_context_bytes(replies[0]))
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
    except (ValueError, TypeError) as err:
        return f"encrypted update does not deserialise: {err}"
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
class EncryptedReply:
    """An encrypted train reply that passed every check."""

    node_id: int
    arrays: ArrayRecord
    model: EncryptedModel
    metrics: MetricRecord
    num_examples: float
    message: Message


class EncryptedReplyChecker:
    """Validate encrypted train replies one by one (CKKS mode's ``ReplyChecker``).

    Parameters
    ----------
    specs : Sequence[ArraySpec]
        The global model's specs (:func:`global_specs` of the initial model).
    public_ctx : ts.Context
        The server's public context.
    weighted_by_key : str (default: "num-examples")
        MetricRecord key with the number of training examples: a finite number > 0.
    """

    def __init__(
        self,
        specs: Sequence[ArraySpec],
        public_ctx: ts.Context,
        weighted_by_key: str = "num-examples",
    ) -> None:
        _require_public(public_ctx)
        self.specs = tuple(specs)
        self.public_ctx = public_ctx
        self.weighted_by_key = weighted_by_key

    def check(self, message: Message) -> EncryptedReply | RejectedReply:
        """Return an :class:`EncryptedReply`, or a ``RejectedReply`` naming the fault."""
        node_id = message.metadata.src_node_id
        if message.has_error():
            return RejectedReply(node_id, f"error reply: {message.error.reason}")
        content = message.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return RejectedReply(
                node_id,
                f"expected one ArrayRecord and one MetricRecord, got "
                f"{len(content.array_records)} and {len(content.metric_records)}",
            )
        arrays = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        weight = example_weight(metrics, self.weighted_by_key)
        if isinstance(weight, str):
            return RejectedReply(node_id, weight)
        model = check_encrypted_reply(arrays, self.specs, self.public_ctx)
        if isinstance(model, str):
            return RejectedReply(node_id, model)
        return EncryptedReply(node_id, arrays, model, metrics, weight, message)

    def split(self, replies: Iterable[Message]) -> tuple[list[EncryptedReply], list[RejectedReply]]:
        """Check every reply and log each rejection; return ``(accepted, rejected)``."""
        return split_replies(self.check, replies)


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
    :mod:`bcsfl_flower.consensus`.

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
    return (matrices[leader] if accepted else None), record


def screen_encrypted(
    gram: np.ndarray, centering: str = "none", zero_tolerance: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a decrypted Gram matrix into the inputs of ``screen_updates``.

    Parameters
    ----------
    gram : np.ndarray
        ``(n, n)`` inner products of the updates.
    centering : {"none", "mean"} (default: "none")
        ``"mean"`` compares the updates after subtracting their mean, computed from
        the Gram matrix alone: ``G_c = J G J`` with ``J = I - 11^T/n`` (skipped below
        :data:`~bcsfl_flower.screening.MIN_CENTERED_UPDATES` updates, as the plaintext
        median centring is). The mean is not robust like the plaintext path's median:
        a large attacking minority pulls it towards itself.
    zero_tolerance : float (default: 1e-6)
        Passed to :func:`~bcsfl_flower.privacy.encrypted_screening.gram_to_cosine`.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Cosine similarities (of the centred updates) and the norms of the raw updates,
        for ``screen_updates(similarity, tau, norms=..., max_norm_ratio=...)``.
    """
    if centering not in GRAM_CENTERINGS:
        raise ValueError(f"centering must be one of {GRAM_CENTERINGS}, got {centering!r}")
    matrix = np.asarray(gram, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"gram must be a square (n, n) matrix, got shape {matrix.shape}")
    norms = np.sqrt(np.clip(np.diag(matrix), 0.0, None))
    compared = matrix
    size = matrix.shape[0]
    if centering == "mean" and size >= MIN_CENTERED_UPDATES:
        centre = np.eye(size) - np.full((size, size), 1.0 / size)
        compared = centre @ matrix @ centre
    return gram_to_cosine(compared, zero_tolerance), norms


def encrypted_global(
    previous: EncryptedModel | ArrayRecord | Mapping[str, np.ndarray],
    trusted_updates: Sequence[EncryptedModel],
    num_examples: Sequence[int | float],
) -> EncryptedModel:
    """Return ``W_{t+1} = W_t + sum_k (n_k / N) D_k``, computed on ciphertexts.

    Parameters
    ----------
    previous : EncryptedModel | ArrayRecord | Mapping[str, np.ndarray]
        ``W_t``: the encrypted global model, or the plaintext initial model ``w_0``
        while no encrypted round has committed yet (then ``add_plain`` is used).
    trusted_updates : Sequence[EncryptedModel]
        The trusted clients' encrypted updates.
    num_examples : Sequence[int | float]
        Their training-set sizes, the weights of FedAvg's mean.

    Raises
    ------
    ValueError
        If there are no updates, a plaintext ``previous`` has other specs than the
        updates, or the layouts differ.
    """
    updates = list(trusted_updates)
    if not updates:
        raise ValueError("encrypted_global needs at least one trusted update")
    aggregate = weighted_mean(updates, num_examples)
    if isinstance(previous, EncryptedModel):
        return add(previous, aggregate)
    plain = _plain(previous)
    if array_specs(plain) != aggregate.specs:
        raise ValueError(
            "the plaintext global model's keys, shapes or dtypes differ from the updates'"
        )
    return add_plain(aggregate, plain)


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
