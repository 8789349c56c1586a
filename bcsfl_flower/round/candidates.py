"""Candidate weightings of a round's updates, computed from their Gram matrix alone.

A candidate is ``w_t + sum_k a_k d_k``: these functions return the coefficient
vectors ``a``. Each works on the clipped updates ``p_k = c_k d_k`` (``c_k`` the clip
factor of :mod:`bcsfl_flower.round.bounds`) through their inner products
``K = C G C``, so the same code serves plaintext and CKKS rounds.

* :func:`mean_coefficients`: the weighted mean of the clipped updates of some rows
  (the trusted cluster's mean is the default candidate).
* :func:`geometric_median_weights`: the weighted geometric median of the clipped
  updates, by Weiszfeld's iteration in the span of the points (distances follow from
  ``K``). Its breakdown point is one half: a minority inside the trusted cluster can
  move it only by a bounded amount, however it chooses its updates.
* :func:`core_rows`: the rows at most the weighted-median distance from the geometric
  median, the cluster's core.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from bcsfl_flower.round.bounds import weighted_median

WEISZFELD_ITERATIONS = 200
"""Upper bound on Weiszfeld steps; it stops earlier once the weights settle."""

WEISZFELD_TOLERANCE = 1e-7
"""Stop when no weight of the median moves by more than this."""


def mean_coefficients(
    rows: np.ndarray | tuple[int, ...], weights: np.ndarray, clip: np.ndarray
) -> np.ndarray:
    """Return the coefficients of the weighted mean of the clipped updates of ``rows``.

    Rows with zero weight drop out; if all of them have zero weight the mean is
    unweighted (a round of freshly slashed clients still has a direction).
    """
    rows = np.asarray(rows, dtype=np.int64)
    coefficients = np.zeros(clip.size)
    if rows.size == 0:
        return coefficients
    share = np.asarray(weights, dtype=np.float64)[rows]
    if share.sum() <= 0:
        share = np.ones(rows.size)
    coefficients[rows] = share / share.sum() * clip[rows]
    return coefficients


def geometric_median_weights(clipped_gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return convex weights ``b`` such that ``sum_k b_k p_k`` is the geometric median.

    Weiszfeld's iteration ``b_k ∝ w_k / ||x - p_k||`` with ``x = sum_j b_j p_j``; the
    squared distances are ``b^T K b - 2 (K b)_k + K_kk``, so only the inner products
    ``K`` of the points are needed. A point the median sits on (distance ~0) is given a
    floor distance so the iteration stays finite.

    Parameters
    ----------
    clipped_gram : np.ndarray
        ``(m, m)`` inner products of the points.
    weights : np.ndarray
        ``(m,)`` non-negative point weights (all zero means equal weights).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0:
        return weights
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    weights = weights / weights.sum()
    scale = float(np.max(np.diag(clipped_gram), initial=0.0))
    floor = 1e-12 * max(scale, 1e-300)
    median = weights.copy()
    for _ in range(WEISZFELD_ITERATIONS):
        distances = np.sqrt(np.maximum(point_distances_squared(clipped_gram, median), floor))
        updated = weights / distances
        updated /= updated.sum()
        if np.max(np.abs(updated - median)) < WEISZFELD_TOLERANCE:
            return cast(np.ndarray, updated)
        median = updated
    return median


def point_distances_squared(gram: np.ndarray, combination: np.ndarray) -> np.ndarray:
    """Return ``||sum_j b_j p_j - p_k||^2`` for every point ``k``, from the Gram matrix."""
    projected = gram @ combination
    return cast(
        np.ndarray, np.clip(combination @ projected - 2.0 * projected + np.diag(gram), 0.0, None)
    )


def core_rows(clipped_gram: np.ndarray, median: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the points no farther from the median than its weighted-median distance.

    At least half the weight lies inside, so the core is never empty, and it excludes
    the far half of the cluster where a coherent minority would sit.
    """
    distances = point_distances_squared(clipped_gram, median)
    cutoff = weighted_median(distances, weights)
    return np.flatnonzero(distances <= cutoff)
