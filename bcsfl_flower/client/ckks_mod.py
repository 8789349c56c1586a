"""The CKKS client mod: encryption that the user's training code never sees.

In CKKS mode (the strategy puts ``"bcsfl-ckks": True``, :data:`CKKS_CONFIG_KEY`, in the
config of its train and evaluate messages) :func:`ckks_mod`

1. decrypts an encrypted global model (an ``ArrayRecord`` written by
   :func:`~bcsfl_flower.privacy.ckks.to_array_record`) into the plaintext ``ArrayRecord``
   the app expects, with the original keys, shapes and dtypes, before the app runs;
2. replaces a train reply's weights ``w_k`` by the encrypted *update*
   ``Enc(w_k - w_t)``, where ``w_t`` is the plaintext global model the app received,
   as one ``ArrayRecord`` under the reply's record name; metrics are left untouched;
3. answers two queries of the server, which holds no secret key:
   ``query.bcsfl_ckks_gram`` (:data:`GRAM_MESSAGE_TYPE`) decrypts the packed encrypted
   Gram matrix of a round's updates (:func:`ckks_gram`), and ``query.bcsfl_ckks_public``
   (:data:`PUBLIC_MESSAGE_TYPE`) returns the public context the server computes with
   (:func:`ckks_public`).

Without the flag in the config, train and evaluate messages pass through untouched.
When the flag is set and anything goes wrong (no key, a malformed ciphertext, a reply
whose arrays do not match the global model), the mod answers with an error reply: in
CKKS mode plaintext weights never leave the node.

Order of mods
    Flower applies mods outermost first, so list ``[bcsfl_mod, ckks_mod]``: the signing
    mod then signs the encrypted update that is actually sent, and miners hash the
    encrypted candidate they receive. Flower only routes a message to a registered
    handler, and mods wrap registered handlers, so the two queries also need handlers;
    :func:`~bcsfl_flower.client.ckks_app.bcsfl_ckks_client_app` builds a ClientApp with
    all of it, importing this module (and TenSEAL) only for CKKS work::

        app = bcsfl_ckks_client_app()     # instead of app = ClientApp()

Where the secret key comes from (:func:`node_secret_context`)
    *Deployment*: the node config key ``bcsfl-ckks-secret-context`` names a secret
    context file from the key ceremony (see :mod:`bcsfl_flower.privacy.ckks_keys`),
    read with :func:`~bcsfl_flower.privacy.ckks_keys.load_secret_context`.
    *Simulation*: otherwise the run config key ``ckks-key-seed`` (an int) seeds the key,
    through :func:`key_seed_bytes`. The run config is visible to the ServerApp as well,
    so this is unsafe outside simulation; a warning is logged once per process.
    Contexts are cached per process, because Flower builds the app anew for every
    message and a context takes about 0.2 s to make.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from bcsfl_flower.extras import import_extra
from bcsfl_flower.privacy.ckks import (
    EncryptedModel,
    array_specs,
    decrypt_arrays,
    encrypt_arrays,
    from_array_record,
    is_encrypted_record,
    to_array_record,
)
from bcsfl_flower.privacy.ckks_keys import (
    create_secret_context,
    load_secret_context,
    public_context,
)
from bcsfl_flower.privacy.encrypted_screening import EncryptedGram, decrypt_gram
from bcsfl_flower.protocol import (
    GRAM_MESSAGE_TYPE,
    PUBLIC_MESSAGE_TYPE,
    gram_reply_content,
    is_ckks_work,
    model_record,
    public_context_content,
    read_gram_request,
)

if TYPE_CHECKING:  # the real modules, for annotations
    import tenseal as ts
else:
    ts = import_extra("ckks", "tenseal", "CKKS aggregation")

SECRET_CONTEXT_NODE_KEY = "bcsfl-ckks-secret-context"
"""Node-config key naming this node's secret context file (deployment)."""

KEY_SEED_RUN_KEY = "ckks-key-seed"
"""Run-config key with the int that seeds the shared secret key (simulation only)."""

GRAM_LOG_RECORD_KEY = "bcsfl.ckks-gram-log"
"""Node state: the latest round a Gram was decrypted for and the request's SHA-256."""

_SEED_PREFIX = "bcsfl-flower/ckks-key-seed/"
_RESCALINGS_IN_A_GRAM = 2  # update x update, then the packing mask

_LOCK = threading.Lock()
_SECRET_CONTEXTS: dict[tuple[str, str], ts.Context] = {}
_PUBLIC_BYTES: dict[tuple[str, str], bytes] = {}
_WARNED_SEED: set[int] = set()


class MissingCKKSKeyError(RuntimeError):
    """The node config names no secret context and the run config has no key seed."""


# ------------------------------------------------------------------------------------------
# The mod and the query handlers
# ------------------------------------------------------------------------------------------


def ckks_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the incoming global model and encrypt the outgoing update (CKKS mode).

    Parameters
    ----------
    msg : Message
        The incoming message.
    context : Context
        The node's context; its node or run config selects the secret key.
    call_next : ClientAppCallable
        The next mod or the app's handler.

    Returns
    -------
    Message
        The app's reply; for a CKKS train message its arrays are replaced by the
        encrypted update. The mod's own reply for the two CKKS queries, and an error
        reply when CKKS mode is on but the mod cannot do its part.
    """
    message_type = msg.metadata.message_type
    if message_type == GRAM_MESSAGE_TYPE:
        return ckks_gram(msg, context)
    if message_type == PUBLIC_MESSAGE_TYPE:
        return ckks_public(msg, context)
    if not is_ckks_work(msg):
        return call_next(msg, context)
    try:
        secret = node_secret_context(context)
        msg.content = _decrypted_content(msg.content, secret)
    except (MissingCKKSKeyError, ValueError, TypeError) as err:
        return _error_reply(msg, f"ckks_mod cannot decrypt the global model: {err}")
    if message_type == MessageType.EVALUATE:
        return call_next(msg, context)

    try:
        global_arrays = _numpy(model_record(msg.content)[1])
    except ValueError as err:
        return _error_reply(msg, f"ckks_mod found no global model: {err}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    try:
        name, trained = model_record(reply.content)
        update = _encrypted_update(global_arrays, _numpy(trained), secret)
    except (ValueError, TypeError) as err:
        return _error_reply(msg, f"ckks_mod cannot encrypt the update: {err}")
    reply.content[name] = to_array_record(update)
    return reply


def ckks_gram(msg: Message, context: Context) -> Message:
    """Decrypt a packed encrypted Gram matrix for the server (committee duty).

    The request (:func:`~bcsfl_flower.protocol.gram_request`) carries the serialised
    :class:`~bcsfl_flower.privacy.encrypted_screening.EncryptedGram` and the round.
    Before decrypting, the node checks what it can, to bound what a curious server
    learns (see :mod:`bcsfl_flower.privacy.encrypted_screening`): every ciphertext
    must have been through the two rescalings of a Gram computation (a fresh update
    ciphertext has not), and the node decrypts at most one Gram per round, answering a
    repeated identical request again but refusing a different one for the same or an
    earlier round.

    Returns
    -------
    Message
        The matrix and its digest (:func:`~bcsfl_flower.protocol.gram_reply_content`), or
        an error reply naming the reason.
    """
    try:
        secret = node_secret_context(context)
    except (MissingCKKSKeyError, ValueError) as err:
        return _error_reply(msg, f"ckks_gram has no key: {err}")
    try:
        data, server_round = read_gram_request(msg.content)
        gram = EncryptedGram.deserialize(data, secret)
        _check_gram_levels(gram, secret)
        _log_gram_request(context, server_round, hashlib.sha256(data).hexdigest())
        matrix = decrypt_gram(gram, secret)
    except (KeyError, TypeError, ValueError) as err:
        return _error_reply(msg, f"ckks_gram refuses to decrypt: {err}")
    return Message(gram_reply_content(matrix), reply_to=msg)


def ckks_public(msg: Message, context: Context) -> Message:
    """Return the public context (public key, relinearisation and Galois keys).

    Generated from this node's secret context once per process (about 0.5 s, 9.5 MB)
    with :func:`~bcsfl_flower.privacy.ckks_keys.public_context`; it cannot decrypt.
    """
    try:
        data = _public_context_bytes(context)
    except (MissingCKKSKeyError, ValueError) as err:
        return _error_reply(msg, f"ckks_public has no key: {err}")
    return Message(public_context_content(data), reply_to=msg)


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------


def key_seed_bytes(seed: int) -> bytes:
    """Return the secret-key seed for the run config's ``ckks-key-seed``.

    The bytes are the UTF-8 text ``"bcsfl-flower/ckks-key-seed/<seed>"`` (decimal
    ``seed``), which :func:`~bcsfl_flower.privacy.ckks_keys.create_secret_context`
    hashes with its own domain into SEAL's PRNG seed. Anyone who knows the int knows the
    key: simulation only.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{KEY_SEED_RUN_KEY} must be an int, got {seed!r}")
    return f"{_SEED_PREFIX}{seed}".encode()


def node_secret_context(context: Context) -> ts.Context:
    """Return this node's CKKS secret context, cached per process.

    ``bcsfl-ckks-secret-context`` in the node config wins; otherwise the run config's
    ``ckks-key-seed`` derives the simulation key (a warning is logged once).

    Raises
    ------
    MissingCKKSKeyError
        If neither key is configured.
    ValueError
        If the file is missing or holds no secret key, or the seed is not an int.
    """
    source = _key_source(context)
    with _LOCK:
        if source not in _SECRET_CONTEXTS:
            kind, value = source
            if kind == "path":
                _SECRET_CONTEXTS[source] = load_secret_context(value)
            else:
                _SECRET_CONTEXTS[source] = create_secret_context(seed=key_seed_bytes(int(value)))
        return _SECRET_CONTEXTS[source]


def _key_source(context: Context) -> tuple[str, str]:
    path = context.node_config.get(SECRET_CONTEXT_NODE_KEY)
    if path is not None:
        return ("path", str(Path(str(path)).expanduser().resolve()))
    seed = context.run_config.get(KEY_SEED_RUN_KEY)
    if seed is None:
        raise MissingCKKSKeyError(
            f"node config has no {SECRET_CONTEXT_NODE_KEY!r} and run config has no "
            f"{KEY_SEED_RUN_KEY!r}; cannot decrypt or encrypt"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"run config {KEY_SEED_RUN_KEY!r} must be an int, got {seed!r}")
    if seed not in _WARNED_SEED:
        _WARNED_SEED.add(seed)
        log(
            WARNING,
            "ckks_mod: the CKKS secret key is derived from the run config's %r, which the "
            "ServerApp can read (simulation only; set %r in the node config for a real "
            "deployment)",
            KEY_SEED_RUN_KEY,
            SECRET_CONTEXT_NODE_KEY,
        )
    return ("seed", str(seed))


def _public_context_bytes(context: Context) -> bytes:
    source = _key_source(context)
    secret = node_secret_context(context)
    with _LOCK:
        if source not in _PUBLIC_BYTES:
            log(INFO, "ckks_mod: generating the public context (evaluation keys)")
            _PUBLIC_BYTES[source] = public_context(secret)
        return _PUBLIC_BYTES[source]


# ------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------


def _decrypted_content(content: RecordDict, secret: ts.Context) -> RecordDict:
    """Return a copy of ``content`` with every encrypted ArrayRecord decrypted."""
    records = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and is_encrypted_record(record):
            arrays = decrypt_arrays(from_array_record(record, secret), secret)
            # np.asarray: a decrypted 0-d integer array can come back as a numpy scalar
            record = ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})
        records[name] = record
    return RecordDict(records)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}


def _encrypted_update(
    global_arrays: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    secret: ts.Context,
) -> EncryptedModel:
    """Encrypt ``trained - global_arrays`` in the global model's key order.

    The difference is taken in float64 (an unsigned or low-precision dtype would wrap
    or round it), and the ciphertext is labelled with the global model's specs, so the
    server sees the model's own keys, shapes and dtypes.
    """
    if set(trained) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(trained))
        extra = sorted(set(trained) - set(global_arrays))
        raise ValueError(
            f"the reply's arrays do not match the global model (missing {missing}, "
            f"unexpected {extra})"
        )
    update = {}
    for key, before in global_arrays.items():
        after = np.asarray(trained[key])
        if after.shape != before.shape:
            raise ValueError(
                f"array {key!r} has shape {list(after.shape)}, the global model "
                f"{list(before.shape)}"
            )
        update[key] = after.astype(np.float64) - before.astype(np.float64)
    encrypted = encrypt_arrays(update, secret)
    return EncryptedModel(array_specs(global_arrays), encrypted.chunks, encrypted.slots)


def _check_gram_levels(gram: EncryptedGram, secret: ts.Context) -> None:
    """Refuse ciphertexts that have not been through a Gram computation's rescalings."""
    fresh = len(secret.seal_context().data.first_context_data().parms().coeff_modulus())
    for index, ciphertext in enumerate(gram.packed):
        if ciphertext.coeff_modulus_size() > fresh - _RESCALINGS_IN_A_GRAM:
            raise ValueError(
                f"packed ciphertext {index} has {ciphertext.coeff_modulus_size()} moduli "
                f"left; a Gram matrix has at most {fresh - _RESCALINGS_IN_A_GRAM}"
            )


def _log_gram_request(context: Context, server_round: int, request_digest: str) -> None:
    """Allow one Gram per round: the same request again, nothing different or older."""
    previous = context.state.config_records.get(GRAM_LOG_RECORD_KEY)
    if previous is not None:
        # the node's own state, written below: the round is an int
        last_round = int(cast(int, previous["round"]))
        last_digest = str(previous["request-sha256"])
        if server_round < last_round:
            raise ValueError(
                f"already decrypted a Gram matrix for round {last_round}; refusing round "
                f"{server_round}"
            )
        if server_round == last_round and request_digest != last_digest:
            raise ValueError(f"already decrypted a different Gram matrix for round {server_round}")
    context.state[GRAM_LOG_RECORD_KEY] = ConfigRecord(
        {"round": server_round, "request-sha256": request_digest}
    )


def _error_reply(msg: Message, reason: str) -> Message:
    log(WARNING, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
