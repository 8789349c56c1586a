"""Bounds: no single reply may dominate a round by its length or its example count.

Two numbers a client controls decide how hard it pulls the aggregate: the length of its
update and the example count it reports. Both are bounded robustly, from the round's
own replies, before anything is averaged:

* **Norm.** Every update longer than the stake-weighted median norm is scaled down to it
  (FLAME clips at the median of all submitted updates' norms). The median is held by
  the honest side as long as attackers hold less than half the stake, so a reply 10^6
  times an honest one weighs no more than an honest one.
* **Examples.** A count above :data:`EXAMPLE_CAP_RATIO` times the stake-weighted median
  count is credited as that cap, so a reply claiming 10^12 or 1e300 examples weighs no
  more than the median client.
* **Stake.** The aggregation weight of a reply is its capped count times its stake, so
  a client slashed in earlier rounds pulls less (see :mod:`bcsfl_flower.round.stakes`).
"""

from __future__ import annotations

import numpy as np

from bcsfl_flower.round.state import Bounds

EXAMPLE_CAP_RATIO = 1.0
"""Example counts are capped at this multiple of the round's stake-weighted median.

At 1 no reply weighs more than the median client: a count above the median is credited
as the median, a count below it keeps FedAvg's weight. The count is the one number a
client reports unchecked, and on skewed data the largest clients are the least typical
(at Dirichlet 0.1 a client with several times the median count mostly holds one class),
so weighting them fully pulls the mean towards their classes. byzfl's robust
aggregators weight every client equally. The measurements it was chosen on are in
``docs/constants.md``."""


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Return the lower weighted median of ``values``.

    The smallest value at which the cumulative weight reaches half of the total. With
    equal weights this is the lower median; a group holding less than half the weight
    cannot move it beyond the other group's values. Zero total weight falls back to
    equal weights.

    Raises
    ------
    ValueError
        If ``values`` is empty or the shapes differ.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.size == 0:
        raise ValueError("weighted_median of no values")
    if values.shape != weights.shape:
        raise ValueError(f"values {values.shape} and weights {weights.shape} differ in shape")
    if not np.any(weights > 0):
        weights = np.ones_like(values)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, 0.5 * cumulative[-1], side="left"))
    return float(values[order][min(index, values.size - 1)])


def bound_updates(
    norms: np.ndarray,
    num_examples: np.ndarray,
    stakes: np.ndarray,
    *,
    example_cap_ratio: float = EXAMPLE_CAP_RATIO,
) -> Bounds:
    """Return the round's norm bound, clip factors, example cap and aggregation weights.

    Parameters
    ----------
    norms : np.ndarray
        ``||d_k||`` of every accepted update (finite, >= 0).
    num_examples : np.ndarray
        Example counts the replies report (finite, > 0).
    stakes : np.ndarray
        The clients' stakes (finite, >= 0).
    example_cap_ratio : float
        Cap on example counts, as a multiple of their stake-weighted median.

    Returns
    -------
    Bounds
        ``clip[k] = min(1, norm_bound / norms[k])`` (1 for a zero update) and
        ``weights[k] = min(num_examples[k], example_cap) * stakes[k]``.
    """
    norms = np.asarray(norms, dtype=np.float64)
    num_examples = np.asarray(num_examples, dtype=np.float64)
    stakes = np.asarray(stakes, dtype=np.float64)
    if not norms.size:
        empty = np.zeros(0)
        return Bounds(empty, 0.0, empty, empty, 0.0, empty)
    norm_bound = weighted_median(norms, stakes)
    clip = np.ones_like(norms)
    longer = norms > norm_bound
    clip[longer] = norm_bound / norms[longer]
    example_cap = example_cap_ratio * weighted_median(num_examples, stakes)
    weights = np.minimum(num_examples, example_cap) * stakes
    return Bounds(
        norms=norms,
        norm_bound=norm_bound,
        clip=clip,
        stakes=stakes,
        example_cap=example_cap,
        weights=weights,
    )
