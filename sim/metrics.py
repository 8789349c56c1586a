"""Metrics of a run: label-flipping damage from confusion matrices, detection, rollbacks.

Label flipping is measured the way LFighter (Jebreel et al., 2023) reports it, over a
mapping ``source class -> target class``:

- **source-class accuracy**: the share of test samples of the source classes that the
  global model classifies correctly;
- **attack success rate (ASR)**: the share of test samples of the source classes that
  it classifies as their attacker's target class.

Both are read off the central test set's confusion matrix (rows: true class, columns:
predicted class). The BCS-FL attack flips every class, ``c -> 9 - c``
(:data:`FLIP_ALL`), so every class is a source: the pooled source-class accuracy then
equals the test accuracy, and the damage to the weakest class shows in
:func:`min_source_class_accuracy`. The functions take any mapping, so a targeted
attack (e.g. ``{7: 1}``) is measured exactly as in LFighter.

Detection is scored per round by the app (``attacker_precision`` = caught / rejected,
``attacker_recall`` = caught / attacking participants, ``None`` where undefined); a
run's figure is the mean over the rounds where the value is defined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

NUM_CLASSES = 10

FLIP_ALL: Mapping[int, int] = {c: NUM_CLASSES - 1 - c for c in range(NUM_CLASSES)}
"""The BCS-FL paper's label flip ``y -> 9 - y`` as a source -> target mapping."""


def _as_confusion(confusion: Any) -> np.ndarray:
    matrix = np.asarray(confusion, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be a square matrix, got shape {matrix.shape}")
    if (matrix < 0).any():
        raise ValueError("confusion must not hold negative counts")
    return matrix


def _check_mapping(matrix: np.ndarray, mapping: Mapping[int, int]) -> None:
    if not mapping:
        raise ValueError("mapping must name at least one source class")
    size = matrix.shape[0]
    for source, target in mapping.items():
        if not (0 <= source < size and 0 <= target < size):
            raise ValueError(f"mapping {source} -> {target} outside the {size} classes")
        if source == target:
            raise ValueError(f"mapping {source} -> {target}: a class cannot be its own target")


def source_class_accuracy(confusion: Any, mapping: Mapping[int, int] = FLIP_ALL) -> float | None:
    """Return the share of source-class test samples classified correctly.

    Parameters
    ----------
    confusion : array-like
        Square confusion matrix, rows = true class, columns = predicted class.
    mapping : Mapping[int, int]
        Source class -> target class of the attack (default: :data:`FLIP_ALL`).

    Returns
    -------
    float | None
        ``sum_s C[s, s] / sum_s sum_j C[s, j]``; None if the source classes have no
        test samples.
    """
    matrix = _as_confusion(confusion)
    _check_mapping(matrix, mapping)
    sources = list(mapping)
    total = matrix[sources].sum()
    return float(matrix[sources, sources].sum() / total) if total else None


def attack_success_rate(confusion: Any, mapping: Mapping[int, int] = FLIP_ALL) -> float | None:
    """Return the share of source-class test samples classified as their target class.

    Parameters
    ----------
    confusion : array-like
        Square confusion matrix, rows = true class, columns = predicted class.
    mapping : Mapping[int, int]
        Source class -> target class of the attack (default: :data:`FLIP_ALL`).

    Returns
    -------
    float | None
        ``sum_s C[s, mapping[s]] / sum_s sum_j C[s, j]``; None if the source classes
        have no test samples.
    """
    matrix = _as_confusion(confusion)
    _check_mapping(matrix, mapping)
    sources = list(mapping)
    targets = [mapping[s] for s in sources]
    total = matrix[sources].sum()
    return float(matrix[sources, targets].sum() / total) if total else None


def min_source_class_accuracy(
    confusion: Any, mapping: Mapping[int, int] = FLIP_ALL
) -> float | None:
    """Return the lowest per-class accuracy among the source classes with test samples.

    Under :data:`FLIP_ALL` the pooled source-class accuracy is the test accuracy; a
    poisoned model that sacrifices one class shows here instead.
    """
    matrix = _as_confusion(confusion)
    _check_mapping(matrix, mapping)
    accuracies = [matrix[s, s] / matrix[s].sum() for s in mapping if matrix[s].sum()]
    return float(min(accuracies)) if accuracies else None


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Return the mean of the values that are not None (None if there are none).

    Per-round precision and recall are undefined in rounds that reject nobody or that
    no attacker took part in; those rounds carry no evidence either way, so they are
    left out of the mean rather than counted as 0 or 1.
    """
    defined = [float(v) for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def count_rollbacks(rounds: Mapping[str, Mapping[str, Any]]) -> int | None:
    """Return how many rounds rolled back; None if no round records an outcome (baselines)."""
    outcomes = [r["outcome"] for r in rounds.values() if "outcome" in r]
    if not outcomes:
        return None
    return sum(outcome == "rollback" for outcome in outcomes)
