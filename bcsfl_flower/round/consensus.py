"""Two-thirds quorums and the validators' accept votes.

A BCS-FL round commits a new global model only when at least two thirds of the
committee agree; otherwise it rolls back to the previous model. Two thirds is the
classic Byzantine fault-tolerance bound: with ``n`` members of which fewer than ``n/3``
are faulty, any two quorums of ``ceil(2n/3)`` overlap in at least one honest member, so
two conflicting decisions cannot both gather a quorum.

The quorum is always measured against the members that were *drawn*, not against
those that happened to reply. A validator that drops out therefore counts against the
candidate, exactly like an explicit "no": otherwise an attacker could shrink the quorum
by keeping honest validators from replying.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bcsfl_flower.round.noise_reference import NOISE_REFERENCES, noise_allowance
from bcsfl_flower.round.state import ValidatorReport

MAX_LOSS_GROWTH = 2.0
"""A candidate whose median validator loss exceeds this multiple of ``w_t``'s never commits.

It bounds rounds with noise references only (noisy updates), where each validator
also tolerates what the trusted mean's sampling error costs it, and when clients' DP
noise swamps their signal that can be anything: 4 clients at the app's batch 32 and
noise 1 had every validator accept a round-1 candidate that raised the median loss
from 2.3 to 5.2. A step that more than doubles the typical validator's loss is worse
than staying put, whatever its cause."""


def accepts(delta: float, tolerance: float) -> bool | None:
    """Return a validator's vote on a candidate from its loss delta.

    The validator accepts when the candidate does not raise its loss by more than
    ``tolerance`` (``dE >= -tolerance``): an honest aggregate may raise the loss a
    little on one validator's non-IID data while improving it for the federation. A
    NaN delta (no loss reported) is an abstention, None, which counts against the
    candidate like a "no".
    """
    if math.isnan(delta):
        return None
    return bool(delta >= -tolerance)  # a NumPy loss must not give np.True_, which `is True` misses


def accept_votes(
    reports: Sequence[ValidatorReport], candidate: str, tolerance: float
) -> dict[str, bool | None]:
    """Return every validator's vote on ``candidate`` (None: abstained or silent).

    Each validator's tolerance is ``tolerance`` plus what the round's noise reference
    cost it (:func:`~bcsfl_flower.round.noise_reference.noise_allowance`; nothing when
    the round built none).
    """
    return {
        report.validator: accepts(report.delta(candidate), tolerance + noise_allowance(report))
        for report in reports
    }


def count_accepts(votes: dict[str, bool | None]) -> int:
    """Return how many validators accepted."""
    return sum(vote is True for vote in votes.values())


def outgrows_baseline(reports: Sequence[ValidatorReport], candidate: str) -> bool:
    """Whether ``candidate``'s median loss exceeds :data:`MAX_LOSS_GROWTH` times ``w_t``'s.

    Only rounds with noise references (noisy updates) are bounded: elsewhere the quorum
    and the fixed tolerance decide alone, as they always have (near-zero losses can
    double within the tolerance). Medians over the validators that reported both
    losses; with none, nothing is known.
    """
    if not any(name in report.candidate_losses for report in reports for name in NOISE_REFERENCES):
        return False
    pairs = [
        (report.baseline_loss, report.candidate_losses.get(candidate, math.nan))
        for report in reports
    ]
    usable = [(base, loss) for base, loss in pairs if math.isfinite(base) and math.isfinite(loss)]
    if not usable:
        return False
    baseline, losses = np.median(np.array(usable), axis=0)
    return bool(losses > MAX_LOSS_GROWTH * max(baseline, 0.0))
