"""Plaintext updates: one float32 matrix of updates, their norms and their directions.

Each accepted reply ``w_k`` is decoded once, straight into row ``d_k = w_k - w_t`` of a
matrix allocated for the round; its norm is kept in float64. A candidate
``w_t + sum_k a_k d_k`` is then ``w_t + a @ rows``: every candidate of a round comes from
one matrix product, whatever its weights, and nothing holds a second copy of all the
models.

The Gram matrix is assembled from the norms (exact) and the cosines of the directions
``u_k = d_k / ||d_k||``, so an update with values near float32's maximum, or scaled by
10^6, never turns it into ``inf``. How the cosines are computed depends on the model:

* up to :data:`EXACT_DIMENSION` parameters, exactly, as one BLAS product of the unit
  rows;
* above it, on a sketch: each unit row is multiplied by random signs and folded into
  :data:`SKETCH_DIMENSION` buckets (a CountSketch with contiguous buckets). Inner products
  of sketches are unbiased estimates of the cosines, with a standard error of about
  ``1/sqrt(SKETCH_DIMENSION)`` (0.011) for updates whose mass is spread over many
  parameters. The signs are drawn anew every round, after the replies have arrived,
  from a secret seed that the round record reveals afterwards: a client cannot place
  its poison where the sketch does not look. This keeps a round's decision within a
  few times FedAvg's cost at a million parameters (``sim/bench_decision.py``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord

from bcsfl_flower.packets import npy_view
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


EXACT_DIMENSION = 32_768
"""Models up to this many parameters are compared exactly (the MNIST CNN has 20,522)."""

SKETCH_DIMENSION = 8_192
"""Buckets of the direction sketch used for larger models."""

_SAFE_SKETCH_NORM = 1e30
"""Rows shorter than this can be sketched before scaling: no bucket sum nears float32's max."""


class DirectionSketch:
    """Random-sign folding of unit updates into :data:`SKETCH_DIMENSION` buckets.

    Parameters
    ----------
    dimension : int
        Number of parameters of the model.
    seed : int
        Seed of the signs (drawn by :meth:`for_round`).
    """

    def __init__(self, dimension: int, seed: int) -> None:
        self.dimension = dimension
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.signs = (2 * rng.integers(0, 2, size=dimension, dtype=np.int8) - 1).astype(np.float32)
        self._folded = (dimension // SKETCH_DIMENSION) * SKETCH_DIMENSION

    @classmethod
    def for_round(cls, dimension: int, seed: int | None = None) -> DirectionSketch | None:
        """Return a sketch, or None for a model compared exactly.

        Its signs are fresh and secret during the round (a client cannot aim at them);
        ``seed`` replays a past round's sketch from its statement.
        """
        if dimension <= EXACT_DIMENSION:
            return None
        return cls(dimension, secrets.randbits(63) if seed is None else seed)

    def __call__(self, unit_row: np.ndarray) -> np.ndarray:
        """Return the sketch of one unit-length row."""
        folded = self._folded
        sketch = np.einsum(
            "ij,ij->j",
            unit_row[:folded].reshape(-1, SKETCH_DIMENSION),
            self.signs[:folded].reshape(-1, SKETCH_DIMENSION),
        )
        tail = self.dimension - folded
        sketch[:tail] += unit_row[folded:] * self.signs[folded:]
        return cast(np.ndarray, sketch)


@dataclass(frozen=True)
class PlainBatch(UpdateBatch):
    """Updates (``(n, d)`` float32), their float64 norms and their direction features.

    ``features`` are the unit rows themselves for a model compared exactly, or their
    sketches; ``sketch_seed`` is the sketch's seed, or None.
    """

    rows: np.ndarray
    norms: np.ndarray
    features: np.ndarray
    sketch_seed: int | None = None
    layout: tuple[tuple[_Slot, ...], np.ndarray] | None = None
    """The slots and the flattened ``w_t`` the rows were taken against."""

    @property
    def size(self) -> int:
        """Number of updates."""
        return int(self.norms.size)


class PlainCollector(UpdateCollector[PlainBatch]):
    """Check replies against ``w_t`` and write their updates into one matrix."""

    def __init__(
        self, global_arrays: ArrayRecord, capacity: int, sketch_seed: int | None = None
    ) -> None:
        self._slots, self._base = _layout(global_arrays)
        self._keys = {slot.key for slot in self._slots}
        self._matrix = np.empty((max(capacity, 0), self._base.size), dtype=np.float32)
        self._sketch = DirectionSketch.for_round(self._base.size, sketch_seed)
        width = self._base.size if self._sketch is None else SKETCH_DIMENSION
        self._features = np.zeros((max(capacity, 0), width), dtype=np.float32)
        self._unit = np.empty(self._base.size, dtype=np.float32)  # reused for every row
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
                values = npy_view(array)  # read in place: the row is the only copy
            except (ValueError, TypeError, EOFError, SyntaxError) as err:
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
            self._features[row_index] = self._direction(row, norm)
        self._norms.append(norm)
        return None

    def _direction(self, row: np.ndarray, norm: float) -> np.ndarray:
        """Return the direction features of one row: its unit vector, or that vector's sketch.

        The sketch is linear, so a row of moderate size is sketched first and the
        sketch scaled (one pass less); a huge row is scaled first, so no bucket sum can
        overflow float32.
        """
        if self._sketch is not None and norm < _SAFE_SKETCH_NORM:
            return self._sketch(row) * np.float32(1.0 / norm)
        unit = np.multiply(row, np.float32(1.0 / norm), out=self._unit)
        return unit if self._sketch is None else self._sketch(unit)

    def finish(self) -> PlainBatch:
        """Return the rows written so far."""
        count = len(self._norms)
        return PlainBatch(
            self._matrix[:count],
            np.asarray(self._norms, dtype=np.float64),
            self._features[:count],
            None if self._sketch is None else self._sketch.seed,
            (self._slots, self._base),
        )

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


class PlainSpace(UpdateSpace[PlainBatch]):
    """Updates the server can read: the default, and what every Flower app sends."""

    name = "plain"

    def collector(self, global_arrays: ArrayRecord, capacity: int) -> PlainCollector:
        """Return a collector for the replies to ``global_arrays``."""
        return PlainCollector(global_arrays, capacity)

    def gram(self, batch: PlainBatch, exchange: GramExchange) -> GramResult:
        """Return ``G = diag(r) C diag(r)`` from the cosines ``C`` and exact norms ``r``."""
        cosines = (batch.features @ batch.features.T).astype(np.float64)
        cosines = np.clip(0.5 * (cosines + cosines.T), -1.0, 1.0)
        gram = cosines * np.outer(batch.norms, batch.norms)
        np.fill_diagonal(gram, batch.norms**2)
        if batch.sketch_seed is None:
            return GramResult(gram, "computed from the plaintext updates")
        return GramResult(
            gram,
            f"cosines from a {SKETCH_DIMENSION}-bucket sketch of the plaintext updates",
            {"sketch_dimension": SKETCH_DIMENSION, "sketch_seed": batch.sketch_seed},
        )

    def combine(
        self, global_arrays: ArrayRecord, batch: PlainBatch, coefficients: np.ndarray
    ) -> tuple[ArrayRecord, ...]:
        """Return ``w_t + a @ rows`` for every row ``a`` of ``coefficients``."""
        slots, base = batch.layout if batch.layout is not None else _layout(global_arrays)
        weights = np.atleast_2d(coefficients).astype(np.float32)
        if batch.size:
            steps = weights @ batch.rows
        else:
            steps = np.zeros((len(weights), base.size), dtype=np.float32)
        models = []
        for flat in steps:
            flat += base
            models.append(ArrayRecord({s.key: Array(_restore(flat, s)) for s in slots}))
        return tuple(models)


def _restore(flat: np.ndarray, slot: _Slot) -> np.ndarray:
    """Return one array of a flattened model in its original shape and dtype."""
    values = flat[slot.start : slot.stop].reshape(slot.shape)
    if slot.dtype.kind in "iub":
        values = np.rint(values)
    return np.ascontiguousarray(values.astype(slot.dtype, copy=False))
