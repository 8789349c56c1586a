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


def rejection_scores(
    rejected: set[int], attackers: set[int], participants: set[int]
) -> dict[str, float | None]:
    """Precision and recall of a round's rejections as an attacker detector.

    Parameters
    ----------
    rejected : set[int]
        Partition ids whose updates the round rejected.
    attackers : set[int]
        Partition ids that attack.
    participants : set[int]
        Partition ids that sent an update this round (only these can be caught).

    Returns
    -------
    dict[str, float | None]
        ``precision`` = caught / rejected and ``recall`` = caught / attacking
        participants; None where the denominator is zero (nothing rejected, or no
        attacker took part), since neither 0 nor 1 would be honest there.
    """
    attacking = attackers & participants
    caught = rejected & attacking
    return {
        "attacker_precision": len(caught) / len(rejected) if rejected else None,
        "attacker_recall": len(caught) / len(attacking) if attacking else None,
    }


UPDATE_ATTACKS = ("sign-flip", "gaussian-noise", "scale")
"""Model-poisoning attacks that rewrite the update instead of the data."""


def poison_update(
    update: dict[str, np.ndarray], attack: str, scale: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Return an attacker's rewritten update ``d' `` for an honest update ``d = w_k - w_t``.

    * ``sign-flip``: ``d' = -scale * d`` (points against the honest direction);
    * ``gaussian-noise``: ``d' ~ N(0, (scale * std(d))^2)`` per array (carries no signal);
    * ``scale``: ``d' = scale * d`` (one client dominates the mean).

    Only floating-point arrays are changed; others pass through.
    """
    if attack not in UPDATE_ATTACKS:
        raise ValueError(f"unknown update attack {attack!r}; expected one of {UPDATE_ATTACKS}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"attack scale must be a finite number > 0, got {scale}")
    poisoned = {}
    for key, delta in update.items():
        if delta.dtype.kind != "f":
            poisoned[key] = delta
        elif attack == "sign-flip":
            poisoned[key] = (-scale * delta).astype(delta.dtype)
        elif attack == "scale":
            poisoned[key] = (scale * delta).astype(delta.dtype)
        else:
            std = float(delta.std()) or 1e-3
            poisoned[key] = rng.normal(0.0, scale * std, size=delta.shape).astype(delta.dtype)
    return poisoned
