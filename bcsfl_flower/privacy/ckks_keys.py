"""CKKS keys for BCS-FL: clients hold the secret key, the server only a public context.

In CKKS mode every client shares one secret key and encrypts its update under the
matching public key; the server adds and multiplies ciphertexts with a *public*
context (public key, relinearisation keys, Galois keys) that cannot decrypt.

Parameters (:class:`CKKSParams`)
    ``poly_modulus_degree`` 8192 gives 4096 slots per ciphertext and 128-bit security
    for the default chain ``coeff_mod_bit_sizes = (60, 40, 40, 60)`` with scale
    ``2**40``. The two 40-bit primes are the multiplicative depth: the weighted
    aggregate uses one (ciphertext times plaintext weight), encrypted screening uses
    both (update times update, then a plaintext mask to pack the results). The outer
    60-bit primes hold the integer part of decrypted values and the key-switching
    special prime.

Where the secret key comes from
    *Simulation*: :func:`create_secret_context` with a ``seed`` derives the same secret
    key in every ClientApp, so all simulated clients agree on a key without sharing a
    file; the ServerApp never calls it. SEAL cannot simply be seeded: a seeded
    ``Blake2xbPRNGFactory`` hands out the *same* stream on every ``create()`` call
    (two encryptions of one plaintext then give identical ciphertexts, and the rows of
    a key-switching key share their randomness, which leaks the secret key). So the
    seed is used for exactly one thing, sampling the ternary secret key; the public
    key, relinearisation keys, Galois keys and every encryption draw fresh operating
    system randomness. Every client then has a different but equally valid public key
    for the same secret key. A seed shared through the run config is visible to the
    ServerApp's process as well: this mode is for experiments, never for production.

    *Deployment*: run a key ceremony out of band: one trusted party (or the
    federation's operator on an offline machine) calls :func:`create_secret_context`
    without a seed, writes it with :func:`save_secret_context` and provisions the file
    to every SuperNode (its path goes in the node config), and hands the bytes of
    :func:`public_context` to whoever runs the ServerApp. The SuperLink and the
    ServerApp never see the secret context file. Clients load it with
    :func:`load_secret_context`; the server loads the public bytes with
    :func:`load_public_context`, which refuses bytes that carry a secret key.

Size
    The public context carries Galois keys only for the rotations that summing a
    ciphertext's slots needs (steps 1, 2, 4, ..., slots/2) and stores them
    seed-compressed: about 9.5 MB for the default parameters, against 35 MB for
    TenSEAL's default key set. It is sent once per run.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from bcsfl_flower.extras import import_extra

if TYPE_CHECKING:  # the real modules, for annotations
    import tenseal as ts
    from tenseal import sealapi
else:
    ts = import_extra("ckks", "tenseal", "CKKS aggregation")
    sealapi = import_extra("ckks", "tenseal.sealapi", "CKKS aggregation")

_SEED_DOMAIN = b"bcsfl-flower/ckks/secret-key/v1"
_MIN_SEED_BYTES = 16
_AUTO_RELIN_RESCALE_MOD_SWITCH = 0b111  # TenSEAL's default automatic-operation flags
_SCRATCH_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True)
class CKKSParams:
    """Encryption parameters of CKKS mode.

    Parameters
    ----------
    poly_modulus_degree : int (default: 8192)
        Ring dimension, a power of two >= 4096; a ciphertext holds half as many values.
    coeff_mod_bit_sizes : tuple[int, ...] (default: (60, 40, 40, 60))
        Bit sizes of the coefficient modulus primes. At least four: first and last
        larger than the scale, the inner ones equal to ``global_scale_bits`` (each is
        one rescaling, and encrypted screening needs two).
    global_scale_bits : int (default: 40)
        Values are encoded at scale ``2**global_scale_bits``; about that many bits of
        precision minus the noise.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if isinstance(degree, bool) or not isinstance(degree, int):
            raise TypeError(f"poly_modulus_degree must be an int, got {degree!r}")
        if degree < 4096 or degree & (degree - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two >= 4096, got {degree}")
        bits = tuple(self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if any(isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise TypeError(f"coeff_mod_bit_sizes must be ints, got {bits!r}")
        if len(bits) < 4:
            raise ValueError(
                f"coeff_mod_bit_sizes needs at least 4 primes (2 rescalings for encrypted "
                f"screening), got {bits}"
            )
        scale = self.global_scale_bits
        if isinstance(scale, bool) or not isinstance(scale, int) or not 20 <= scale <= 60:
            raise ValueError(f"global_scale_bits must be an int in [20, 60], got {scale!r}")
        if any(b != scale for b in bits[1:-1]):
            raise ValueError(
                f"the inner coeff_mod_bit_sizes {bits[1:-1]} must all equal global_scale_bits="
                f"{scale}, so that rescaling keeps the scale"
            )
        if bits[0] <= scale or bits[-1] <= scale or bits[0] > 60 or bits[-1] > 60:
            raise ValueError(
                f"the first and last coeff_mod_bit_sizes must be in ({scale}, 60], got {bits}"
            )

    @property
    def slot_count(self) -> int:
        """Number of values one ciphertext holds."""
        return self.poly_modulus_degree // 2


def create_secret_context(
    params: CKKSParams | None = None, seed: bytes | None = None, n_threads: int | None = None
) -> ts.Context:
    """Create a CKKS context holding a secret key (for clients only).

    Parameters
    ----------
    params : CKKSParams, optional
        Encryption parameters; the defaults documented on :class:`CKKSParams`.
    seed : bytes, optional
        Derive the secret key from this seed (at least 16 bytes), so every simulated
        client gets the same key; see the module docstring for why only the secret
        key is derived. None draws it from the operating system (key ceremony).
    n_threads : int, optional
        Threads TenSEAL may use; defaults to the CPU count.

    Returns
    -------
    ts.Context
        A private context (``is_private()`` is True) with a public key. It has no
        Galois or relinearisation keys: clients only encrypt and decrypt.

    Raises
    ------
    ValueError
        If the parameters are rejected by SEAL (e.g. not 128-bit secure), or the seed
        is too short.
    """
    params = CKKSParams() if params is None else params
    if not isinstance(params, CKKSParams):
        raise TypeError(f"params must be CKKSParams, got {type(params).__name__}")
    if seed is not None:
        if not isinstance(seed, bytes | bytearray):
            raise TypeError(f"seed must be bytes, got {type(seed).__name__}")
        if len(seed) < _MIN_SEED_BYTES:
            raise ValueError(f"seed must be at least {_MIN_SEED_BYTES} bytes, got {len(seed)}")

    parms = _encryption_parameters(params)
    context = _seal_context(parms)
    if seed is None:
        secret_key = sealapi.KeyGenerator(context).secret_key()
    else:
        seeded = _encryption_parameters(params)
        seeded.set_random_generator(sealapi.Blake2xbPRNGFactory(_seed_words(bytes(seed))))
        secret_key = sealapi.KeyGenerator(_seal_context(seeded)).secret_key()
    public_key = sealapi.PublicKey()
    sealapi.KeyGenerator(context, secret_key).create_public_key(public_key)

    proto = _context_proto_class()()
    proto.encryption_parameters = seal_bytes(parms)
    proto.encryption_type = int(ts.ENCRYPTION_TYPE.ASYMMETRIC.value)
    proto.public_context.public_key = seal_bytes(public_key)
    proto.public_context.auto_flags = _AUTO_RELIN_RESCALE_MOD_SWITCH
    proto.public_context.scale = float(2**params.global_scale_bits)
    proto.private_context.secret_key = seal_bytes(secret_key)
    return load_context(proto.SerializeToString(), n_threads=n_threads)


def public_context(secret_context: ts.Context) -> bytes:
    """Serialise the server's context: public key and evaluation keys, no secret key.

    Generates fresh relinearisation keys (for ciphertext-ciphertext products) and
    Galois keys for the power-of-two rotations that sum a ciphertext's slots, then
    writes them with the public key. The result cannot decrypt anything.

    Parameters
    ----------
    secret_context : ts.Context
        A context holding the secret key, from :func:`create_secret_context` or
        :func:`load_secret_context`.

    Returns
    -------
    bytes
        Serialised public TenSEAL context, for :func:`load_public_context`.
    """
    _require_private(secret_context, "secret_context")
    proto_class = _context_proto_class()
    private = proto_class.FromString(
        secret_context.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )
    parms = _load_parms(private.encryption_parameters)
    context = _seal_context(parms)
    secret_key = load_seal(sealapi.SecretKey(), context, private.private_context.secret_key)
    keygen = sealapi.KeyGenerator(context, secret_key)
    degree = parms.poly_modulus_degree()
    steps = [1 << i for i in range(int(math.log2(degree // 2)))]
    galois_elements = [pow(3, step, 2 * degree) for step in steps]  # SEAL's step -> element

    public = proto_class()
    public.encryption_parameters = private.encryption_parameters
    public.encryption_type = private.encryption_type
    public.public_context.public_key = private.public_context.public_key
    public.public_context.auto_flags = private.public_context.auto_flags
    public.public_context.scale = private.public_context.scale
    public.public_context.relin_keys = seal_bytes(keygen.create_relin_keys())
    public.public_context.galois_keys = seal_bytes(keygen.create_galois_keys(galois_elements))
    return cast(bytes, public.SerializeToString())


def load_context(data: bytes, n_threads: int | None = None) -> ts.Context:
    """Deserialise a TenSEAL context (public or secret)."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"context data must be bytes, got {type(data).__name__}")
    try:
        return ts.context_from(bytes(data), n_threads=n_threads)
    except Exception as error:  # TenSEAL raises bare C++ errors on malformed input
        raise ValueError(f"not a serialised TenSEAL context: {error}") from error


def load_public_context(data: bytes, n_threads: int | None = None) -> ts.Context:
    """Deserialise the server's context, refusing bytes that carry a secret key.

    A guard for the ServerApp: in CKKS mode the server must never hold the secret key,
    so a misrouted secret context fails loudly instead of silently weakening the
    scheme.
    """
    context = load_context(data, n_threads=n_threads)
    if context.is_private():
        raise ValueError(
            "the context holds a secret key; the server must only receive public_context()"
        )
    if not (context.has_relin_keys() and context.has_galois_keys()):
        raise ValueError(
            "the public context lacks relinearisation or Galois keys; build it with "
            "public_context()"
        )
    return context


def save_secret_context(secret_context: ts.Context, path: str | os.PathLike[str]) -> None:
    """Write a secret context to ``path``, readable by its owner only (mode 0600).

    The file is written next to ``path`` and renamed into place, so a reader never
    sees a partial key.
    """
    _require_private(secret_context, "secret_context")
    target = Path(path)
    data = secret_context.serialize(save_secret_key=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_secret_context(path: str | os.PathLike[str], n_threads: int | None = None) -> ts.Context:
    """Read a secret context written by :func:`save_secret_context`."""
    target = Path(path)
    if not target.is_file():
        raise ValueError(f"CKKS secret context file {str(target)!r} does not exist")
    context = load_context(target.read_bytes(), n_threads=n_threads)
    if not context.is_private():
        raise ValueError(f"CKKS context file {str(target)!r} holds no secret key")
    return context


def slot_count(context: ts.Context) -> int:
    """Return how many values one ciphertext of ``context`` holds."""
    parms = context.seal_context().data.key_context_data().parms()
    return int(parms.poly_modulus_degree()) // 2


def _require_private(context: ts.Context, name: str) -> None:
    if not isinstance(context, ts.Context):
        raise TypeError(f"{name} must be a tenseal.Context, got {type(context).__name__}")
    if not context.is_private():
        raise ValueError(f"{name} holds no secret key")


def _encryption_parameters(params: CKKSParams) -> sealapi.EncryptionParameters:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    return parms


def _seal_context(parms: sealapi.EncryptionParameters) -> sealapi.SEALContext:
    context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ValueError(f"CKKS parameters rejected by SEAL: {context.parameters_error_message()}")
    return context


def _seed_words(seed: bytes) -> list[int]:
    """Stretch a seed into SEAL's 512-bit PRNG seed (eight 64-bit words)."""
    digest = hashlib.sha512(_SEED_DOMAIN + seed).digest()
    return [int(word) for word in np.frombuffer(digest, dtype="<u8")]


def seal_bytes(obj: Any) -> bytes:
    """Return SEAL's own serialisation of ``obj`` (sealapi only writes to files)."""
    with tempfile.TemporaryDirectory(dir=_SCRATCH_DIR) as directory:
        path = os.path.join(directory, "object")
        obj.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def load_seal(obj: Any, context: sealapi.SEALContext, data: bytes) -> Any:
    """Load SEAL-serialised ``data`` into ``obj`` (sealapi only reads from files)."""
    with tempfile.TemporaryDirectory(dir=_SCRATCH_DIR) as directory:
        path = os.path.join(directory, "object")
        with open(path, "wb") as handle:
            handle.write(data)
        obj.load(context, path)
    return obj


def _load_parms(data: bytes) -> sealapi.EncryptionParameters:
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    with tempfile.TemporaryDirectory(dir=_SCRATCH_DIR) as directory:
        path = os.path.join(directory, "parms")
        with open(path, "wb") as handle:
            handle.write(data)
        parms.load(path)
    return parms


_PROTO_CLASS: Any = None


def _context_proto_class() -> Any:
    """Return a message class for TenSEAL's ``TenSEALContextProto``.

    TenSEAL ships the ``.proto`` (tenseal/proto/tensealcontext.proto) but not its
    Python bindings; this builds the same wire format from a descriptor.
    """
    global _PROTO_CLASS
    if _PROTO_CLASS is not None:
        return _PROTO_CLASS
    field = descriptor_pb2.FieldDescriptorProto
    spec = descriptor_pb2.FileDescriptorProto(
        name="bcsfl_flower/tenseal_context.proto", package="bcsfl_tenseal", syntax="proto3"
    )
    layouts: dict[str, list[tuple[str, int, int, str | None]]] = {
        "Private": [
            ("secret_key", 1, field.TYPE_BYTES, None),
            ("relin_keys_generated", 2, field.TYPE_BOOL, None),
            ("galois_keys_generated", 3, field.TYPE_BOOL, None),
        ],
        "Public": [
            ("public_key", 1, field.TYPE_BYTES, None),
            ("auto_flags", 2, field.TYPE_UINT32, None),
            ("scale", 3, field.TYPE_DOUBLE, None),
            ("relin_keys", 4, field.TYPE_BYTES, None),
            ("galois_keys", 5, field.TYPE_BYTES, None),
        ],
        "Context": [
            ("encryption_parameters", 1, field.TYPE_BYTES, None),
            ("public_context", 2, field.TYPE_MESSAGE, ".bcsfl_tenseal.Public"),
            ("private_context", 3, field.TYPE_MESSAGE, ".bcsfl_tenseal.Private"),
            ("encryption_type", 4, field.TYPE_UINT32, None),
        ],
    }
    for message_name, fields in layouts.items():
        message = spec.message_type.add(name=message_name)
        for name, number, kind, type_name in fields:
            entry = message.field.add(
                name=name, number=number, type=kind, label=field.LABEL_OPTIONAL
            )
            if type_name is not None:
                entry.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(spec)
    _PROTO_CLASS = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("bcsfl_tenseal.Context")
    )
    return _PROTO_CLASS
