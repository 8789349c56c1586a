"""Planning a round: from its Gram matrix to the candidates its validators score.

Bound, screen, then the selection rule's candidates: a pure function of the round's
inner products, example counts and stakes. The pipeline, ``bcsfl audit replay`` and
the bench's aggregate (:func:`~bcsfl_flower.round.aggregate.screened_mean`) all call
:func:`plan_round`, so a replayed round and an attack tuned against BCSFL see exactly
the stages the round ran; only the I/O around it (the exchange that yields the Gram
matrix, the committee exchange) differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bcsfl_flower.round.screening import ScreeningSettings, bound_and_screen
from bcsfl_flower.round.selection import SelectionRule
from bcsfl_flower.round.state import Bounds, CandidatePlan, Screening


@dataclass(frozen=True)
class RoundPlan:
    """What the bound, screen and plan stages decided before anyone voted.

    Attributes
    ----------
    bounds : Bounds
        Norm bound, clip factors, capped example weights and stakes.
    screening : Screening
        The trusted cluster, the set-apart and rejected rows, and why.
    candidates : CandidatePlan
        The candidates as weightings of the updates, in order of preference.
    """

    bounds: Bounds
    screening: Screening
    candidates: CandidatePlan


def plan_round(
    gram: np.ndarray,
    num_examples: np.ndarray,
    stakes: np.ndarray,
    settings: ScreeningSettings,
    selection: SelectionRule,
    names: Sequence[str],
) -> RoundPlan:
    """Return the round's bounds, screening and candidate plan.

    Parameters
    ----------
    gram : np.ndarray
        ``(n, n)`` inner products of the accepted updates.
    num_examples : np.ndarray
        ``(n,)`` example counts the clients claimed.
    stakes : np.ndarray
        ``(n,)`` stakes at the start of the round.
    settings : ScreeningSettings
        The round's (or its statement's) screening settings.
    selection : SelectionRule
        The rule that turns the screen into candidates.
    names : Sequence[str]
        The clients' names, one per row.
    """
    bounds, screening = bound_and_screen(gram, num_examples, stakes, settings)
    return RoundPlan(bounds, screening, selection.plan(gram, bounds, screening, names))
