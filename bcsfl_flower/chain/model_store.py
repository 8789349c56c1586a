"""Off-chain, content-addressed store of committed global models.

The chain holds only each round's 32-byte model hash; the models themselves live here,
one file per model, named by the hex of :func:`~bcsfl_flower.packets.model_hash`::

    <root>/<64 hex digits>.npz
    <root>/<64 hex digits>.json        round state statements, with the validators'
                                       signed ballots (SHA-256 of the file)

A file is an ordinary NumPy ``.npz`` archive (one ``<key>.npy`` member per array, no
pickles), so ``numpy.load`` opens it anywhere. Its name is only an index: verification
loads the arrays and recomputes the canonical hash, so a file that was edited, or
renamed to another hash, fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from bcsfl_flower.packets import ArraysLike, model_hash

_HEX_HASH = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".npz"
DOCUMENT_SUFFIX = ".json"


class ModelIntegrityError(ValueError):
    """A stored model does not hash to the hash it is stored (or anchored) under."""


class ModelStore:
    """Save, load and verify models under their canonical hash.

    Parameters
    ----------
    root : str | os.PathLike
        Directory of the store; created on first save.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, digest: bytes | str) -> Path:
        """Return the file path for a hash (bytes or hex, with or without ``0x``)."""
        return self.root / f"{_hex(digest)}{SUFFIX}"

    def document_path(self, digest: bytes | str) -> Path:
        """Return the file path of the document (a round statement) stored under a hash."""
        return self.root / f"{_hex(digest)}{DOCUMENT_SUFFIX}"

    def save(self, arrays: ArraysLike) -> bytes:
        """Store a model and return its hash; storing the same model twice is a no-op.

        The file is written to a temporary name and renamed, so a crash never leaves a
        half-written file under a valid hash.
        """
        numpy_arrays = _as_numpy(arrays)
        digest = model_hash(numpy_arrays)
        target = self.path(digest)
        if target.is_file():
            return digest
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".tmp")
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
            for key in sorted(numpy_arrays):
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, numpy_arrays[key], allow_pickle=False)
        os.replace(temporary, target)
        return digest

    def load(self, digest: bytes | str, *, verify: bool = True) -> dict[str, np.ndarray]:
        """Load the model stored under ``digest``.

        Raises
        ------
        FileNotFoundError
            If no model is stored under that hash.
        ModelIntegrityError
            If ``verify`` and the arrays do not hash to ``digest``.
        """
        target = self.path(digest)
        if not target.is_file():
            raise FileNotFoundError(f"no model 0x{_hex(digest)} in {self.root}")
        _refuse_link(target)
        arrays = load_model_file(target)
        if verify:
            actual = model_hash(arrays)
            if actual.hex() != _hex(digest):
                raise ModelIntegrityError(
                    f"{target} hashes to 0x{actual.hex()}, not 0x{_hex(digest)}: "
                    f"the file was modified"
                )
        return arrays

    def verify(self, digest: bytes | str) -> None:
        """Check that the model stored under ``digest`` re-hashes to it.

        Raises
        ------
        FileNotFoundError
            If it is missing.
        ModelIntegrityError
            If it does not re-hash to ``digest`` (or cannot be read at all).
        """
        self.load(digest, verify=True)

    def save_document(self, data: bytes) -> bytes:
        """Store a document (a round statement) under its SHA-256 hash and return the hash."""
        digest = hashlib.sha256(data).digest()
        target = self.document_path(digest)
        if not target.is_file():
            _write_atomically(target, data)
        return digest

    def load_document(self, digest: bytes | str) -> bytes:
        """Load the document stored under ``digest``, checking that it still hashes to it.

        Raises
        ------
        FileNotFoundError
            If no document is stored under that hash.
        ModelIntegrityError
            If the file does not hash to ``digest``: it was modified.
        """
        target = self.document_path(digest)
        if not target.is_file():
            raise FileNotFoundError(f"no document 0x{_hex(digest)} in {self.root}")
        _refuse_link(target)
        data = target.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != _hex(digest):
            raise ModelIntegrityError(
                f"{target} hashes to 0x{actual}, not 0x{_hex(digest)}: the file was modified"
            )
        return data

    def hashes(self) -> list[str]:
        """Return the hex hashes of all stored files (by name; not verified)."""
        if not self.root.is_dir():
            return []
        return sorted(
            path.stem for path in self.root.glob(f"*{SUFFIX}") if _HEX_HASH.fullmatch(path.stem)
        )


def load_model_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a model ``.npz`` (without pickles) into a dict of arrays.

    Raises
    ------
    ModelIntegrityError
        If the file is not a readable ``.npz`` of plain arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ModelIntegrityError(f"{path} is not a readable model archive: {err}") from err


def _refuse_link(target: Path) -> None:
    """Refuse a stored file that is a symbolic link.

    An audit reads the run directory's own files: a link to a pristine copy elsewhere
    would let a tampered file pass, and would read outside the directory.
    """
    if target.is_symlink():
        raise ModelIntegrityError(
            f"{target} is a symbolic link (to {os.readlink(target)}); the store holds "
            "only its own files"
        )


def _write_atomically(target: Path, data: bytes) -> None:
    """Write to a temporary name and rename, so a crash never leaves a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def _as_numpy(arrays: ArraysLike) -> dict[str, np.ndarray]:
    if isinstance(arrays, ArrayRecord):
        return {key: array.numpy() for key, array in arrays.items()}
    if isinstance(arrays, Mapping):
        return {key: np.asarray(value) for key, value in arrays.items()}
    raise TypeError(f"arrays must be an ArrayRecord or a mapping, got {type(arrays).__name__}")


def _hex(digest: bytes | str) -> str:
    if isinstance(digest, bytes):
        if len(digest) != 32:
            raise ValueError(f"a model hash is 32 bytes, got {len(digest)}")
        return digest.hex()
    if isinstance(digest, str):
        text = digest.lower().removeprefix("0x")
        if _HEX_HASH.fullmatch(text):
            return text
    raise ValueError(f"not a model hash: {digest!r}")
