"""BCSFL's server-side aggregate as a pure function of the update matrix.

The round's own path (:mod:`bcsfl_flower.round.pipeline`) works on Flower messages,
a committee and a chain. Attack optimisers, such as ``byzfl``'s
``Optimal_ALittleIsEnough`` and ``Optimal_InnerProductManipulation``, need the
aggregate as ``f(vectors) -> vector`` so they can search for the update that moves it
furthest. :func:`screened_mean` is that function: the bound and screen stages the
pipeline runs (:func:`~bcsfl_flower.round.planning.plan_round`), then the
trusted-mean rule's trusted-cluster mean: what commits whenever the validators accept
it and reject the federation mean with any group the screen set apart. An attack
tuned against it is an attack tuned to pass BCSFL's screen.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from bcsfl_flower.round.planning import plan_round
from bcsfl_flower.round.selection import TrustedMeanSelection
from bcsfl_flower.round.settings import RoundSettings


def screened_mean(
    updates: np.ndarray,
    num_examples: np.ndarray | None = None,
    stakes: np.ndarray | None = None,
    settings: RoundSettings | None = None,
) -> np.ndarray:
    """Return the trusted cluster's bounded mean of ``updates``.

    Parameters
    ----------
    updates : np.ndarray
        ``(n, d)`` client updates ``w_k - w_t``.
    num_examples : np.ndarray, optional
        Example counts (default: equal).
    stakes : np.ndarray, optional
        Stakes at the start of the round (default: equal).
    settings : RoundSettings, optional
        Screening settings (default: BCSFL's defaults).

    Returns
    -------
    np.ndarray
        ``(d,)`` the step the round's preferred candidate takes.
    """
    matrix = np.asarray(updates, dtype=np.float64)
    size = matrix.shape[0]
    counts = np.ones(size) if num_examples is None else np.asarray(num_examples, np.float64)
    stake = np.ones(size) if stakes is None else np.asarray(stakes, np.float64)
    gram = matrix @ matrix.T
    rule = TrustedMeanSelection()
    names = [str(i) for i in range(size)]
    plan = plan_round(gram, counts, stake, settings or RoundSettings(), rule, names).candidates
    row = plan.names.index(rule.MEAN) if rule.MEAN in plan.names else 0  # 0: contested
    return cast(np.ndarray, plan.coefficients[row] @ matrix)
