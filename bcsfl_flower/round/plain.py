"""Plaintext updates: one float32 matrix of update directions and their norms.

Each accepted reply ``w_k`` becomes one row ``d_k = w_k - w_t`` of a matrix allocated
once for the round, then the row is scaled to unit length in place and its norm kept
in float64. Storing directions and norms separately has two uses:

* the Gram matrix is one float32 BLAS product of unit rows (cosines in ``[-1, 1]``,
  which cannot overflow), rescaled by the norms in float64. An update with values near
  float32's maximum, or scaled by 10^6, therefore never turns the Gram into ``inf``;
* a candidate ``w_t + sum_k a_k d_k`` is ``w_t + (a * norms) @ directions``: every
  candidate of a round comes from one matrix product, whatever its weights.

Every client's model is decoded once, straight into its row; nothing else holds a
second copy of all the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from bcsfl_flower.round.space import GramExchange, UpdateCollector, UpdateSpace
from bcsfl_flower.round.state import GramResult, UpdateBatch


@dataclass(frozen=True)
class _Slot:
    """Where one array of the model sits in a flattened update."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def _layout(arrays: ArrayRecord) -> tuple[tuple[_Slot, ...], np.ndarray]:
    """Return the slots of ``arrays`` (record order) and the model flattened to float32."""
    slots = []
    values = []
    start = 0
    for key, array in arrays.items():
        value = array.numpy()
        slots.append(_Slot(key, value.dtype, tuple(value.shape), start, start + value.size))
        values.append(np.ravel(value).astype(np.float32))
        start += value.size
    flat = np.concatenate(values) if values else np.zeros(0, np.float32)
    return tuple(slots), flat


@dataclass(frozen=True)
class PlainBatch(UpdateBatch):
    """Unit update directions (``(n, d)`` float32) and their float64 norms."""

    directions: np.ndarray
    norms: np.ndarray

    @property
    def size(self) -> int:  # type: ignore[override]
        """Number of updates."""
        return int(self.norms.size)


class PlainCollector(UpdateCollector):
    """Check replies against ``w_t`` and write their updates into one matrix."""

    def __init__(self, global_arrays: ArrayRecord, capacity: int) -> None:
        self._slots, self._base = _layout(global_arrays)
        self._keys = {slot.key for slot in self._slots}
        self._matrix = np.empty((max(capacity, 0), self._base.size), dtype=np.float32)
        self._norms: list[float] = []

    def add(self, arrays: ArrayRecord) -> str | None:
        """Decode, check and store one reply's update; return a fault or None."""
        row_index = len(self._norms)
        if row_index >= self._matrix.shape[0]:
            raise RuntimeError("more replies than the collector was sized for")
        fault = self._key_fault(arrays)
        if fault is not None:
            return fault
        row = self._matrix[row_index]
        for slot in self._slots:
            array = arrays[slot.key]
            if array.dtype != str(slot.dtype) or tuple(array.shape) != slot.shape:
                return (
                    f"array '{slot.key}' is {array.dtype}{list(array.shape)}, "
                    f"expected {slot.dtype}{list(slot.shape)}"
                )
            try:
                values = array.numpy()
            except (ValueError, TypeError, EOFError) as err:
                return f"array '{slot.key}' cannot be decoded: {err}"
            if values.dtype != slot.dtype or values.shape != slot.shape:
                return f"array '{slot.key}' decodes to {values.dtype}{list(values.shape)}"
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below
                np.subtract(
                    np.ravel(values),
                    self._base[slot.start : slot.stop],
                    out=row[slot.start : slot.stop],
                    casting="unsafe",
                )
        with np.errstate(over="ignore", invalid="ignore"):
            norm = float(np.linalg.norm(row))
        if not math.isfinite(norm):
            fault = self._overflow_fault(arrays, row)
            if fault is not None:
                return fault
            norm = float(np.linalg.norm(row.astype(np.float64)))
        if norm > 0:
            row *= np.float32(1.0 / norm)
        self._norms.append(norm)
        return None

    def finish(self) -> PlainBatch:
        """Return the rows written so far."""
        count = len(self._norms)
        return PlainBatch(self._matrix[:count], np.asarray(self._norms, dtype=np.float64))

    def _key_fault(self, arrays: ArrayRecord) -> str | None:
        keys = set(arrays.keys())
        if keys == self._keys:
            return None
        parts = []
        missing, extra = sorted(self._keys - keys), sorted(keys - self._keys)
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        return "arrays do not match the global model: " + ", ".join(parts)

    def _overflow_fault(self, arrays: ArrayRecord, row: np.ndarray) -> str | None:
        """Name the array that holds NaN or inf, in the reply or in its update."""
        for slot in self._slots:
            values = arrays[slot.key].numpy()
            if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
                return f"array '{slot.key}' contains NaN or infinite values"
            if not np.all(np.isfinite(row[slot.start : slot.stop])):
                return f"array '{slot.key}' minus the global model overflows float32"
        return None


class PlainSpace(UpdateSpace):
    """Updates the server can read: the default, and what every Flower app sends."""

    name = "plain"

    def collector(self, global_arrays: ArrayRecord, capacity: int) -> PlainCollector:
        """Return a collector for the replies to ``global_arrays``."""
        return PlainCollector(global_arrays, capacity)

    def gram(self, batch: PlainBatch, exchange: GramExchange) -> GramResult:  # type: ignore[override]
        """Return ``G = diag(r) (U U^T) diag(r)`` from unit rows ``U`` and norms ``r``."""
        cosines = (batch.directions @ batch.directions.T).astype(np.float64)
        cosines = np.clip(0.5 * (cosines + cosines.T), -1.0, 1.0)
        gram = cosines * np.outer(batch.norms, batch.norms)
        np.fill_diagonal(gram, batch.norms**2)
        return GramResult(gram, "computed from the plaintext updates")

    def combine(  # type: ignore[override]
        self, global_arrays: ArrayRecord, batch: PlainBatch, coefficients: np.ndarray
    ) -> tuple[ArrayRecord, ...]:
        """Return ``w_t + (a * r) @ U`` for every row ``a`` of ``coefficients``."""
        slots, base = _layout(global_arrays)
        weights = (np.atleast_2d(coefficients) * batch.norms[None, :]).astype(np.float32)
        steps = weights @ batch.directions if batch.size else np.zeros((len(weights), base.size))
        models = []
        for step in steps:
            flat = base + step
            models.append(ArrayRecord({s.key: Array(_restore(flat, s)) for s in slots}))
        return tuple(models)


def _restore(flat: np.ndarray, slot: _Slot) -> np.ndarray:
    """Return one array of a flattened model in its original shape and dtype."""
    values = flat[slot.start : slot.stop].reshape(slot.shape)
    if slot.dtype.kind in "iub":
        values = np.rint(values)
    return np.ascontiguousarray(values.astype(slot.dtype))
