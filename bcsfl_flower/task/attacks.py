"""Simulated poisoning attacks used to evaluate robustness (simulation only)."""

from __future__ import annotations

import numpy as np


def choose_attackers(num_partitions: int, fraction: float, seed: int) -> frozenset[int]:
    """Pick which partitions are attackers, deterministically from ``seed``.

    ``round(fraction * num_partitions)`` distinct partition ids are drawn uniformly
    without replacement, so the same seed always names the same attackers and an
    experiment can be repeated with identical adversaries.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients) in the federation.
    fraction : float
        Fraction of partitions that attack, in [0, 1).
    seed : int
        Seed of the numpy Generator that makes the draw.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"attacker fraction must be in [0, 1), got {fraction}")
    count = round(fraction * num_partitions)
    if count == 0:
        return frozenset()
    rng = np.random.default_rng([seed, 0xA77AC4])
    return frozenset(int(i) for i in rng.choice(num_partitions, size=count, replace=False))


def flip_labels(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Return the BCS-FL paper's label flip ``y -> (num_classes - 1) - y`` as a new array."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return (num_classes - 1) - labels
