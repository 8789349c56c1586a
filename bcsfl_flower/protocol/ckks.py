"""CKKS: Gram decryption by key holders and the public context.

Part of :mod:`bcsfl_flower.protocol` (see its docstring for the exchanges).
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)

from bcsfl_flower.protocol.config import (
    CKKS_CONFIG_KEY,
    ROUND_KEY,
    config_value,
)

GRAM_ACTION = "bcsfl_ckks_gram"
"""Action of the Gram decryption query (a Python identifier, as Flower requires)."""

GRAM_MESSAGE_TYPE = f"{MessageType.QUERY}.{GRAM_ACTION}"
"""Message type of the Gram decryption query: ``"query.bcsfl_ckks_gram"``."""

PUBLIC_ACTION = "bcsfl_ckks_public"
"""Action of the public context query."""

PUBLIC_MESSAGE_TYPE = f"{MessageType.QUERY}.{PUBLIC_ACTION}"
"""Message type of the public context query: ``"query.bcsfl_ckks_public"``."""


def is_ckks_work(msg: Message) -> bool:
    """Whether ``msg`` is one of the CKKS queries or a train/evaluate flagged CKKS."""
    message_type = msg.metadata.message_type
    if message_type in (GRAM_MESSAGE_TYPE, PUBLIC_MESSAGE_TYPE):
        return True
    return (
        message_type in (MessageType.TRAIN, MessageType.EVALUATE)
        and msg.has_content()
        and config_value(msg.content, CKKS_CONFIG_KEY) is True
    )


GRAM_REQUEST_RECORD_KEY = "bcsfl.ckks-gram-request"
"""Gram query: ConfigRecord with ``gram`` (EncryptedGram bytes) and ``server-round``."""

GRAM_RECORD_KEY = "bcsfl.ckks-gram"
"""Gram reply: ArrayRecord with the decrypted ``(n, n)`` float64 matrix under ``gram``."""

GRAM_DIGEST_RECORD_KEY = "bcsfl.ckks-gram-digest"
"""Gram reply: ConfigRecord with ``sha256``, the hex :func:`gram_digest` of the matrix."""

PUBLIC_RECORD_KEY = "bcsfl.ckks-public"
"""Public context reply: ArrayRecord with the serialised context as ``uint8`` under
``context``. An ArrayRecord rather than ConfigRecord bytes, because Flower transfers
arrays in chunks and the context is about 9.5 MB."""


def gram_request(data: bytes, server_round: int) -> RecordDict:
    """Return the content of a Gram query (send it as :data:`GRAM_MESSAGE_TYPE`).

    Parameters
    ----------
    data : bytes
        The serialised packed encrypted Gram matrix (``EncryptedGram.serialize()``).
    server_round : int
        The round it screens; a node decrypts one Gram per round.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"gram data must be bytes, got {type(data).__name__}")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise TypeError(f"server_round must be an int, got {server_round!r}")
    record = ConfigRecord({"gram": data, ROUND_KEY: server_round})
    return RecordDict({GRAM_REQUEST_RECORD_KEY: record})


def read_gram_request(content: RecordDict) -> tuple[bytes, int]:
    """Return the serialised Gram and the round of a Gram query.

    Raises
    ------
    ValueError
        If the record is missing or its fields have the wrong types.
    """
    record = content.config_records.get(GRAM_REQUEST_RECORD_KEY)
    if record is None:
        raise ValueError(f"no {GRAM_REQUEST_RECORD_KEY!r} record")
    data, server_round = record.get("gram"), record.get(ROUND_KEY)
    if not isinstance(data, bytes):
        raise ValueError("the request's 'gram' is not bytes")
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"the request's {ROUND_KEY!r} must be an int, got {server_round!r}")
    return data, server_round


def gram_digest(matrix: np.ndarray) -> str:
    """Return the SHA-256 hex digest of a decrypted Gram matrix.

    Hashes the ASCII shape ``"<n>x<n>"`` then the values as little-endian float64 in C
    order. Decryption is deterministic, so honest committee members holding the same
    key return the same digest for the same ciphertext.
    """
    values = np.ascontiguousarray(matrix, dtype="<f8")
    shape = "x".join(str(size) for size in values.shape).encode()
    return hashlib.sha256(shape + values.tobytes()).hexdigest()


def gram_reply_content(matrix: np.ndarray) -> RecordDict:
    """Return a key holder's answer to a Gram query: the matrix and its digest."""
    return RecordDict(
        {
            GRAM_RECORD_KEY: ArrayRecord({"gram": Array(np.asarray(matrix, dtype=np.float64))}),
            GRAM_DIGEST_RECORD_KEY: ConfigRecord({"sha256": gram_digest(matrix)}),
        }
    )


def read_gram_reply(reply: Message, num_models: int) -> tuple[np.ndarray, str] | str:
    """Parse a committee member's Gram reply; never raises (a member may lie or fail).

    Returns
    -------
    tuple[np.ndarray, str] | str
        The ``(num_models, num_models)`` matrix and its digest (recomputed here, and
        required to equal the one the member reported), or the reason the reply is
        unusable.
    """
    if reply.has_error():
        return f"error reply: {reply.error.reason}"
    record = reply.content.array_records.get(GRAM_RECORD_KEY)
    digest_record = reply.content.config_records.get(GRAM_DIGEST_RECORD_KEY)
    if record is None or "gram" not in record or digest_record is None:
        return f"reply lacks {GRAM_RECORD_KEY!r} or {GRAM_DIGEST_RECORD_KEY!r}"
    try:
        matrix = record["gram"].numpy()
    except (ValueError, TypeError, EOFError) as err:  # np.load raises EOFError on no bytes
        return f"Gram matrix cannot be decoded: {err}"
    if matrix.dtype != np.float64 or matrix.shape != (num_models, num_models):
        return (
            f"Gram matrix is {matrix.dtype}{list(matrix.shape)}, expected "
            f"float64[{num_models}, {num_models}]"
        )
    if not np.all(np.isfinite(matrix)):
        return "Gram matrix contains NaN or infinite values"
    digest = gram_digest(matrix)
    if digest_record.get("sha256") != digest:
        return "reported sha256 does not match the returned matrix"
    return matrix, digest


def public_context_content(data: bytes) -> RecordDict:
    """Return a client's answer to the public context query."""
    record = ArrayRecord({"context": Array(np.frombuffer(data, dtype=np.uint8))})
    return RecordDict({PUBLIC_RECORD_KEY: record})


def read_public_context(reply: Message) -> bytes:
    """Return the serialised public context from a :data:`PUBLIC_MESSAGE_TYPE` reply.

    Raises
    ------
    ValueError
        If the reply is an error or lacks the context.
    """
    if reply.has_error():
        raise ValueError(f"error reply: {reply.error.reason}")
    record = reply.content.array_records.get(PUBLIC_RECORD_KEY)
    if record is None or "context" not in record:
        raise ValueError(f"reply has no {PUBLIC_RECORD_KEY!r} ArrayRecord with 'context'")
    try:
        payload = record["context"].numpy()
    except (ValueError, TypeError, EOFError) as err:  # np.load raises EOFError on no bytes
        raise ValueError(f"the public context cannot be decoded: {err}") from err
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError("the public context must be a 1-D uint8 array")
    return payload.tobytes()
