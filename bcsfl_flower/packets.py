"""Canonical model hashing and EIP-712 signed packets.

Everything BCS-FL anchors or signs refers to a model by one 32-byte hash, so the hash
must not depend on how the model happens to sit in memory: not on the insertion order
of its arrays, not on the host's byte order, not on C or Fortran layout. :func:`model_hash`
defines that hash once.

Clients sign a :class:`ModelPacket` for every train reply and miners sign a
:class:`RoundApproval` for every committed round. Both are EIP-712 typed data, signed
with eth-account, so that the :file:`BCSFLAudit` contract can check miners' approvals
with ``ecrecover``, and so that a signature is bound to one chain and one contract by
the EIP-712 domain (``name="BCSFLAudit"``, ``version="1"``, ``chainId``,
``verifyingContract``): it cannot be replayed on another chain, another deployment, or
(as the round is signed) another round.

:class:`PacketVerifier` is the server-side check of a client's packet.
"""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from hashlib import sha256
from typing import Any

import numpy as np
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import is_address, keccak, to_checksum_address
from flwr.app import Array, ArrayRecord, ConfigRecord

HASH_BYTES = 32
"""Length of a model hash and of every root, in bytes."""

SIGNATURE_BYTES = 65
"""Length of an ``(r, s, v)`` signature, in bytes."""

DOMAIN_NAME = "BCSFLAudit"
"""EIP-712 domain name; must equal the name hashed by the contract."""

DOMAIN_VERSION = "1"
"""EIP-712 domain version; must equal the version hashed by the contract."""

PACKET_RECORD_KEY = "bcsfl.packet"
"""Key of the :class:`~flwr.app.ConfigRecord` that carries a signed packet in a reply."""

RUN_MEMBER = {"name": "run", "type": "bytes32"}
"""First member of every signed struct: the run's identity (:attr:`Eip712Domain.run`)."""

MODEL_PACKET_TYPES: dict[str, list[dict[str, str]]] = {
    "ModelPacket": [
        RUN_MEMBER,
        {"name": "modelHash", "type": "bytes32"},
        {"name": "timestamp", "type": "uint64"},
        {"name": "round", "type": "uint64"},
        {"name": "client", "type": "address"},
    ]
}
"""EIP-712 types of a client's model packet."""

_UINT64_MAX = 2**64 - 1
_HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_HASHABLE_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex
_U64 = struct.Struct("<Q")

ArraysLike = ArrayRecord | Mapping[str, np.ndarray]
"""What :func:`model_hash` accepts: a Flower ArrayRecord or a mapping of NumPy arrays."""


# ------------------------------------------------------------------------------------------
# Canonical model hash
# ------------------------------------------------------------------------------------------


def model_hash(arrays: ArraysLike) -> bytes:
    """Return the canonical SHA-256 hash of a model.

    The hash is SHA-256 over the concatenation, for every array in ascending order of its
    key (Python string order, i.e. by code point), of::

        u64(len(key_utf8))   || key_utf8
        u64(len(dtype_str))  || dtype_str      e.g. b"<f4", b"<i8", b"|u1", b"|b1"
        u64(ndim) || u64(shape[0]) || ... || u64(shape[ndim - 1])
        u64(len(data))       || data

    where ``u64`` is an unsigned 64-bit little-endian integer, ``dtype_str`` is the NumPy
    ``dtype.str`` of the array's dtype in little-endian byte order (ASCII; one-byte types
    keep NumPy's ``"|"`` marker), and ``data`` is the array's elements in C (row-major)
    order, each in little-endian byte order. Every field is length-prefixed, so the
    encoding is unambiguous; sorting the keys makes it independent of insertion order.

    Only plain numeric and boolean dtypes are accepted (kinds ``b i u f c``): object,
    string and structured arrays have no canonical byte form.

    Hashing copies each array at most once: an array that is already C-contiguous and
    little-endian is hashed through a view of its buffer, and an ``Array`` of an
    ArrayRecord is read straight from its serialized ``.npy`` bytes without
    deserializing it. Only a big-endian or non-C-contiguous array is converted, in one
    pass.

    Parameters
    ----------
    arrays : ArrayRecord | Mapping[str, numpy.ndarray]
        The model, e.g. ``msg.content["arrays"]`` or a ``{name: ndarray}`` dict.

    Returns
    -------
    bytes
        The 32-byte digest.

    Raises
    ------
    TypeError
        If ``arrays`` is neither, a key is not a ``str``, a value is not an array, or an
        array's dtype is not hashable.
    ValueError
        If an ``Array``'s bytes are not a readable ``.npy`` (a client's garbage).
    """
    digest = sha256()
    for key, array in _sorted_arrays(arrays):
        canonical = _canonical_array(key, array)
        key_bytes = key.encode("utf-8")
        dtype_bytes = canonical.dtype.str.encode("ascii")
        digest.update(_U64.pack(len(key_bytes)))
        digest.update(key_bytes)
        digest.update(_U64.pack(len(dtype_bytes)))
        digest.update(dtype_bytes)
        digest.update(_U64.pack(canonical.ndim))
        for dim in canonical.shape:
            digest.update(_U64.pack(dim))
        digest.update(_U64.pack(canonical.nbytes))
        # an ndarray is a buffer, which numpy's stubs do not declare
        digest.update(memoryview(canonical.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    return digest.digest()


def _sorted_arrays(arrays: ArraysLike) -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(arrays, ArrayRecord):
        items: Mapping[str, Any] = arrays
        convert: Callable[[Any], np.ndarray] = npy_view
    elif isinstance(arrays, Mapping):
        items = arrays
        convert = np.asarray
    else:
        raise TypeError(
            f"arrays must be an ArrayRecord or a Mapping[str, np.ndarray], "
            f"got {type(arrays).__name__}"
        )
    for key in items:
        if not isinstance(key, str):
            raise TypeError(f"array keys must be str, got {key!r} ({type(key).__name__})")
    for key in sorted(items):
        value = items[key]
        if not isinstance(value, np.ndarray | Array):
            raise TypeError(f"array {key!r} is a {type(value).__name__}, not an array")
        yield key, convert(value)


def npy_view(array: Array) -> np.ndarray:
    """Return a read-only view of the elements inside an ``Array``'s ``.npy`` bytes.

    ``Array.numpy()`` would deserialize into a fresh copy; reading the ``.npy`` header and
    viewing the payload in place keeps hashing copy-free for the common case.
    """
    if not isinstance(array, Array):
        raise TypeError(f"expected a flwr Array, got {type(array).__name__}")
    if array.stype != "numpy.ndarray":
        raise TypeError(f"cannot hash an Array serialized as {array.stype!r}")
    try:
        return _read_npy(array)
    except (ValueError, SyntaxError, EOFError) as err:  # what numpy raises on garbage
        raise ValueError(f"array bytes are not a readable .npy: {err}") from err


def _read_npy(array: Array) -> np.ndarray:
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:  # .npy 3.0 only differs for non-latin-1 structured field names: take the slow path
        return array.numpy()
    if dtype.hasobject:
        raise TypeError(f"cannot hash an Array of dtype {dtype} (object)")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _canonical_array(key: str, array: np.ndarray) -> np.ndarray:
    """Return ``array`` as C-contiguous little-endian, copying only when needed."""
    dtype = array.dtype
    if dtype.kind not in _HASHABLE_KINDS or dtype.fields is not None or dtype.subdtype:
        raise TypeError(
            f"array {key!r} has dtype {dtype} ({dtype.str}); only boolean and numeric "
            f"dtypes have a canonical encoding"
        )
    little = dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype
    return np.require(array, dtype=little, requirements="C")


# ------------------------------------------------------------------------------------------
# EIP-712
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eip712Domain:
    """The EIP-712 domain every BCS-FL signature is bound to.

    Attributes
    ----------
    chain_id : int
        Chain id of the chain the audit contract lives on.
    verifying_contract : str
        Address of the deployed ``BCSFLAudit`` contract (stored checksummed).
    run : bytes
        The run's identity, the contract's ``runId`` (32 bytes). It is not a field of
        the EIP-712 domain, which OpenZeppelin's ``EIP712`` fixes, but the first member
        of every signed struct (:data:`RUN_MEMBER`): the embedded chain deploys every
        run's contract at the same address on the same chain id, and without it a
        packet or certificate of one run would verify in another.
    """

    chain_id: int
    verifying_contract: str
    run: bytes

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int):
            raise TypeError(f"chain_id must be an int, got {self.chain_id!r}")
        if self.chain_id < 1:
            raise ValueError(f"chain_id must be >= 1, got {self.chain_id}")
        if not isinstance(self.verifying_contract, str) or not is_address(self.verifying_contract):
            raise ValueError(
                f"verifying_contract must be an address, got {self.verifying_contract!r}"
            )
        object.__setattr__(self, "verifying_contract", to_checksum_address(self.verifying_contract))
        check_hash("run", self.run)

    def signable(
        self, types: dict[str, list[dict[str, str]]], message: Mapping[str, Any]
    ) -> SignableMessage:
        """Return the EIP-712 message of struct ``types`` with ``message`` in this run."""
        return encode_typed_data(
            domain_data=self.as_dict(),
            message_types=types,
            message_data={"run": self.run, **message},
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the domain in the form eth-account's ``encode_typed_data`` expects."""
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


def typed_data_digest(signable: SignableMessage) -> bytes:
    """Return the 32-byte EIP-712 digest ``keccak256(0x1901 || domain || struct)``.

    This is the value ``ecrecover`` is applied to, on chain and off.
    """
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def recover_signer(signable: SignableMessage, signature: bytes) -> str:
    """Recover the checksummed signer of ``signable``, applying the contract's rules.

    Parameters
    ----------
    signable : SignableMessage
        The EIP-712 message.
    signature : bytes
        A 65-byte ``r || s || v`` signature.

    Returns
    -------
    str
        The checksummed signer address.

    Raises
    ------
    ValueError
        If the signature is not 65 bytes, ``v`` is not 27 or 28, or ``s`` is in the upper
        half of the curve order (a malleable copy): ``BCSFLAudit`` rejects those, so they
        are rejected off chain too.
    """
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"signature must be {SIGNATURE_BYTES} bytes, got {signature!r}")
    s_value = int.from_bytes(signature[32:64], "big")
    v_value = signature[64]
    if v_value not in (27, 28):
        raise ValueError(f"signature v must be 27 or 28, got {v_value}")
    if s_value > _HALF_CURVE_ORDER:
        raise ValueError("signature s is in the upper half of the curve order (malleable)")
    try:
        signer = Account.recover_message(signable, signature=bytes(signature))
    except (BadSignature, ValidationError) as err:
        raise ValueError(f"signature does not recover: {err}") from err
    return to_checksum_address(signer)


@dataclass(frozen=True)
class ModelPacket:
    """A client's statement "I produced the model with this hash for this round".

    Attributes
    ----------
    model_hash : bytes
        :func:`model_hash` of the reply's arrays.
    timestamp : int
        Unix time in seconds when the client signed.
    round : int
        The server round the reply answers.
    client : str
        The signing client's address (stored checksummed).
    """

    model_hash: bytes
    timestamp: int
    round: int
    client: str

    def __post_init__(self) -> None:
        check_hash("model_hash", self.model_hash)
        check_uint64("timestamp", self.timestamp)
        check_uint64("round", self.round)
        if not isinstance(self.client, str) or not is_address(self.client):
            raise ValueError(f"client must be an address, got {self.client!r}")
        object.__setattr__(self, "client", to_checksum_address(self.client))

    def signable(self, domain: Eip712Domain) -> SignableMessage:
        """Return the EIP-712 message for this packet under ``domain``."""
        return domain.signable(
            MODEL_PACKET_TYPES,
            {
                "modelHash": self.model_hash,
                "timestamp": self.timestamp,
                "round": self.round,
                "client": self.client,
            },
        )

    def digest(self, domain: Eip712Domain) -> bytes:
        """Return the packet's EIP-712 digest under ``domain``."""
        return typed_data_digest(self.signable(domain))

    def sign(self, account: LocalAccount, domain: Eip712Domain) -> SignedModelPacket:
        """Sign the packet; ``account`` must be the packet's client.

        Raises
        ------
        ValueError
            If ``account.address`` is not ``self.client``.
        """
        if account.address != self.client:
            raise ValueError(f"account {account.address} cannot sign a packet of {self.client}")
        signed = account.sign_message(self.signable(domain))
        return SignedModelPacket(self, bytes(signed.signature))


@dataclass(frozen=True)
class SignedModelPacket:
    """A :class:`ModelPacket` with its 65-byte signature, as carried in a train reply.

    Attributes
    ----------
    packet : ModelPacket
        The signed statement.
    signature : bytes
        ``r || s || v`` over the packet's EIP-712 digest.
    """

    packet: ModelPacket
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise ValueError(f"signature must be {SIGNATURE_BYTES} bytes, got {self.signature!r}")

    def recover(self, domain: Eip712Domain) -> str:
        """Return the checksummed address that signed the packet under ``domain``."""
        return recover_signer(self.packet.signable(domain), self.signature)

    def to_config_record(self) -> ConfigRecord:
        """Return the packet as a ConfigRecord (stored under :data:`PACKET_RECORD_KEY`)."""
        return ConfigRecord(
            {
                "model-hash": self.packet.model_hash,
                "timestamp": self.packet.timestamp,
                "round": self.packet.round,
                "client": self.packet.client,
                "signature": self.signature,
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> SignedModelPacket:
        """Parse a packet written by :meth:`to_config_record`.

        Raises
        ------
        ValueError
            If a field is missing or has the wrong type, naming the field.
        """
        fields = typed_fields(
            record,
            "packet",
            (
                ("model-hash", bytes),
                ("timestamp", int),
                ("round", int),
                ("client", str),
                ("signature", bytes),
            ),
        )
        packet = ModelPacket(
            model_hash=fields["model_hash"],
            timestamp=fields["timestamp"],
            round=fields["round"],
            client=fields["client"],
        )
        return cls(packet, fields["signature"])


def accepted_root(packets: Iterable[SignedModelPacket], domain: Eip712Domain) -> bytes:
    """Return the commitment to the packets accepted into a round.

    It is ``keccak256`` of the accepted packets' EIP-712 digests, sorted ascending and
    concatenated; the empty set (no client signs, e.g. without the bcsfl client mod)
    commits to ``bytes(32)``. Anyone holding the packets can recompute it, and a packet
    cannot be added or removed without changing it.
    """
    digests = sorted(signed.packet.digest(domain) for signed in packets)
    if not digests:
        return bytes(HASH_BYTES)
    return keccak(b"".join(digests))


# ------------------------------------------------------------------------------------------
# Verification of client packets
# ------------------------------------------------------------------------------------------


class RejectReason(StrEnum):
    """Why :class:`PacketVerifier` rejected a packet."""

    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    UNREGISTERED = "unregistered-signer"
    WRONG_ROUND = "wrong-round"
    STALE = "timestamp-outside-window"
    HASH_MISMATCH = "hash-mismatch"
    DUPLICATE = "duplicate"


class PacketRejectedError(ValueError):
    """A client packet failed verification.

    Attributes
    ----------
    reason : RejectReason
        The machine-readable reason.
    detail : str
        A human-readable explanation naming the offending value.
    """

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class PacketVerifier:
    """Check the signed packets that clients attach to their train replies.

    A packet is accepted when, in this order: its signature is canonical and recovers to
    the client address it claims; that address is registered; it names the current round;
    its timestamp lies in ``[now - window_s, now + clock_skew_s]``; it hashes the reply's
    arrays; and the client has no accepted packet for the round yet. Only accepted packets
    count as "seen", so a forged packet cannot lock a client out of a round.

    Parameters
    ----------
    domain : Eip712Domain
        The domain clients sign under.
    registered : Iterable[str]
        Addresses of registered clients.
    window_s : float, optional
        Maximum age of a packet, in seconds. Default 300.
    clock_skew_s : float, optional
        How far in the future a timestamp may lie, for clients with a fast clock.
        Default 30.
    clock : Callable[[], float], optional
        Returns the current Unix time; injectable for tests. Default :func:`time.time`.
    """

    def __init__(
        self,
        domain: Eip712Domain,
        registered: Iterable[str],
        *,
        window_s: float = 300.0,
        clock_skew_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if clock_skew_s < 0:
            raise ValueError(f"clock_skew_s must be >= 0, got {clock_skew_s}")
        self.domain = domain
        self.window_s = float(window_s)
        self.clock_skew_s = float(clock_skew_s)
        self._clock = clock
        self._registered: set[str] = set()
        self._seen: dict[int, set[str]] = {}
        for address in registered:
            self.register(address)

    def register(self, address: str) -> None:
        """Add a registered client address."""
        if not isinstance(address, str) or not is_address(address):
            raise ValueError(f"registered address {address!r} is not an address")
        self._registered.add(to_checksum_address(address))

    def is_registered(self, address: str) -> bool:
        """Return whether ``address`` is registered."""
        return is_address(address) and to_checksum_address(address) in self._registered

    def verify(
        self,
        signed: SignedModelPacket | ConfigRecord,
        arrays: ArraysLike,
        server_round: int,
    ) -> SignedModelPacket:
        """Verify a reply's packet against the reply's arrays and accept it.

        Parameters
        ----------
        signed : SignedModelPacket | ConfigRecord
            The packet, or the reply's :data:`PACKET_RECORD_KEY` record.
        arrays : ArrayRecord | Mapping[str, numpy.ndarray]
            The arrays of the same reply.
        server_round : int
            The round being trained.

        Returns
        -------
        SignedModelPacket
            The accepted packet (parsed if a record was given).

        Raises
        ------
        PacketRejectedError
            With the first failed check's :class:`RejectReason`.
        """
        if isinstance(signed, ConfigRecord):
            try:
                signed = SignedModelPacket.from_config_record(signed)
            except ValueError as err:
                raise PacketRejectedError(RejectReason.MALFORMED, str(err)) from err
        if not isinstance(signed, SignedModelPacket):
            raise PacketRejectedError(
                RejectReason.MALFORMED, f"expected a signed packet, got {type(signed).__name__}"
            )
        packet = signed.packet
        try:
            signer = signed.recover(self.domain)
        except ValueError as err:
            raise PacketRejectedError(RejectReason.BAD_SIGNATURE, str(err)) from err
        if signer != packet.client:
            raise PacketRejectedError(
                RejectReason.BAD_SIGNATURE,
                f"packet claims client {packet.client} but was signed by {signer}",
            )
        if signer not in self._registered:
            raise PacketRejectedError(RejectReason.UNREGISTERED, f"{signer} is not registered")
        if packet.round != server_round:
            raise PacketRejectedError(
                RejectReason.WRONG_ROUND,
                f"packet of {signer} is for round {packet.round}, expected {server_round}",
            )
        now = self._clock()
        if not now - self.window_s <= packet.timestamp <= now + self.clock_skew_s:
            raise PacketRejectedError(
                RejectReason.STALE,
                f"packet of {signer} has timestamp {packet.timestamp}, outside "
                f"[{now - self.window_s:.0f}, {now + self.clock_skew_s:.0f}]",
            )
        try:
            actual = model_hash(arrays)
        except (TypeError, ValueError) as err:
            raise PacketRejectedError(RejectReason.MALFORMED, str(err)) from err
        if actual != packet.model_hash:
            raise PacketRejectedError(
                RejectReason.HASH_MISMATCH,
                f"packet of {signer} signs model hash 0x{packet.model_hash.hex()}, "
                f"but the reply's arrays hash to 0x{actual.hex()}",
            )
        seen = self._seen.setdefault(server_round, set())
        if signer in seen:
            raise PacketRejectedError(
                RejectReason.DUPLICATE, f"{signer} already has a packet in round {server_round}"
            )
        seen.add(signer)
        for old_round in [r for r in self._seen if r < server_round - 1]:
            del self._seen[old_round]
        return signed


def typed_fields(
    record: ConfigRecord, what: str, fields: Iterable[tuple[str, type]]
) -> dict[str, Any]:
    """Return ``record``'s ``fields`` as keyword arguments (``-`` becomes ``_``).

    Every wire record a client or the server sends (packets, approvals, ballots) is
    parsed through this one check, so a missing or mistyped field is always refused
    the same way, naming ``what`` and the field.

    Raises
    ------
    ValueError
        If a field is missing or has the wrong type, naming the field.
    """
    values = {}
    for name, kind in fields:
        if name not in record:
            raise ValueError(f"{what} record lacks field {name!r}")
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{what} field {name!r} must be {kind.__name__}, got {type(value).__name__}"
            )
        values[name.replace("-", "_")] = value
    return values


def to_hex(data: bytes) -> str:
    """Return ``data`` as a ``0x``-prefixed hex string (the inverse of :func:`from_hex`)."""
    return "0x" + data.hex()


def from_hex(text: object) -> bytes:
    """Return the bytes of a ``0x``-prefixed hex string (the JSON form of hashes here).

    Raises
    ------
    ValueError
        If ``text`` is not such a string.
    """
    if not isinstance(text, str) or not text.startswith("0x"):
        raise ValueError(f"expected a 0x-prefixed hex string, got {text!r}")
    return bytes.fromhex(text[2:])


def check_hash(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a 32-byte hash."""
    if not isinstance(value, bytes) or len(value) != HASH_BYTES:
        raise ValueError(f"{name} must be {HASH_BYTES} bytes, got {value!r}")


def check_uint64(name: str, value: object) -> None:
    """Raise naming ``name`` unless ``value`` is an int that fits in a ``uint64``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"{name} must fit in uint64, got {value}")
