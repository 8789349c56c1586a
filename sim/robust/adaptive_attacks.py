"""Attacks that adapt to a defence, exported as :data:`ADAPTIVE_ATTACKS`.

The bench's attacks in :mod:`sim.robust.attacks` mostly have every attacker send the same
vector, which a defence that screens for a coordinated, identical group can set apart
cheaply. The attacks here remove that tell or aim at what a screen keeps:

- ``noisy-copies`` and ``own-deviation`` make the attackers' updates differ from one
  another the way honest updates do, so the group no longer looks like copies;
- ``median-norm`` gives a sign-flipping update an ordinary norm, so a norm test passes it;
- ``min-max`` and ``min-sum`` (Shejwalkar and Houmansadr, NDSS 2021) push as far from the
  honest mean as distance-based screens allow, whichever aggregator is under test;
- ``mimic-set-apart`` copies the most unusual honest client, to amplify a minority that a
  screen would set apart, or to have it set apart with the attackers.

Like the bench's other attacks they are omniscient: they see the round's honest updates.
"""

from __future__ import annotations

from collections.abc import Callable

import byzfl
import numpy as np
from scipy.spatial.distance import cdist, pdist, squareform

from sim.robust.attacks import Attack, RoundView

STD_DDOF = 1
"""Degrees of freedom for the honest per-coordinate std (unbiased, as byzfl's ALIE)."""

GAMMA_START = 10.0
"""First strength tried by the min-max / min-sum search (the paper's initial lambda)."""

GAMMA_DOUBLINGS = 16
"""How often the search may double a strength that still passes, before it bisects."""

GAMMA_STEPS = 30
"""Bisection steps of the min-max / min-sum search (a relative precision near 1e-9)."""


def _honest(view: RoundView) -> np.ndarray:
    return np.asarray(view.honest, dtype=np.float64)


def _honest_std(honest: np.ndarray) -> np.ndarray:
    return honest.std(axis=0, ddof=STD_DDOF)


def _tile(vector: np.ndarray, count: int) -> np.ndarray:
    return np.tile(np.asarray(vector, dtype=np.float64).ravel(), (count, 1))


def largest_gamma(passes: Callable[[float], bool]) -> float:
    """Return the largest strength ``gamma >= 0`` for which ``passes(gamma)`` holds.

    Shejwalkar and Houmansadr's search: starting from :data:`GAMMA_START`, the strength
    doubles while it passes (at most :data:`GAMMA_DOUBLINGS` times), then
    :data:`GAMMA_STEPS` halving steps close in on the boundary. ``passes`` is assumed to
    hold on an interval ``[0, gamma*]``, as the min-max and min-sum constraints do (their
    scores are convex in gamma and pass at 0).

    Parameters
    ----------
    passes : Callable[[float], bool]
        Whether a strength satisfies the attack's constraint.

    Returns
    -------
    float
        The largest passing strength found; 0 when none passes.
    """
    low, high = 0.0, GAMMA_START
    for _ in range(GAMMA_DOUBLINGS):
        if not passes(high):
            break
        low, high = high, 2.0 * high
    else:
        return low
    for _ in range(GAMMA_STEPS):
        middle = 0.5 * (low + high)
        if passes(middle):
            low = middle
        else:
            high = middle
    return low


class NoisyCopies(Attack):
    """Sign flipping with honest-sized noise, so that the attackers are not copies.

    Every attacker sends byzfl's SignFlipping vector, ``-mean(honest)``, plus its own
    Gaussian noise whose per-coordinate std is the honest updates' per-coordinate std.
    This models attackers who hide their coordination from a screen that looks for
    identical (or too similar) updates: their spread around the shared vector is the
    honest clients' spread around theirs.
    """

    name = "noisy-copies"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return ``-mean(honest)`` plus fresh honest-std noise for each attacker."""
        honest = _honest(view)
        noise = view.rng.normal(size=(view.num_attackers, honest.shape[1]))
        return -honest.mean(axis=0) + noise * _honest_std(honest)


class OwnDeviation(Attack):
    """ALIE plus each attacker's own honest-looking deviation.

    The shared vector is byzfl's ALittleIsEnough at its default strength (1.5 honest
    stds per coordinate from the honest mean, the bench's ``alie``); attacker ``i`` adds
    ``own[i] - mean(own)``, the deviation of its own honestly trained update from the
    attackers' mean. This models attackers who keep ALIE's small, coordinated shift but
    differ from one another exactly as clients with their own data do.
    """

    name = "own-deviation"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the ALIE vector plus each attacker's deviation from the attackers' mean."""
        alie = np.asarray(byzfl.ALittleIsEnough()(_honest(view)), dtype=np.float64)
        own = np.asarray(view.own, dtype=np.float64)
        return alie + (own - own.mean(axis=0))


class MedianNorm(Attack):
    """Sign flipping at an honest norm.

    Every attacker sends the direction opposite to the honest mean, scaled to the median
    honest norm. This models attackers who defeat a norm screen (or norm clipping): the
    update points the wrong way but is as long as a typical honest one.
    """

    name = "median-norm"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return ``-mean / |mean|`` times the median honest norm, for every attacker."""
        honest = _honest(view)
        mean = honest.mean(axis=0)
        norm = np.median(np.linalg.norm(honest, axis=1))
        scale = norm / max(float(np.linalg.norm(mean)), np.finfo(np.float64).tiny)
        return _tile(-scale * mean, view.num_attackers)


class DistanceBoundedAttack(Attack):
    """Shejwalkar and Houmansadr's aggregation-agnostic attack (NDSS 2021).

    The malicious update is ``mean(honest) + gamma * p`` with the perturbation
    ``p = -std(honest)`` per coordinate (the paper's "inverse std"), and ``gamma`` the
    largest strength (:func:`largest_gamma`) whose :meth:`score` stays within the
    :meth:`bound` that the honest updates set among themselves. Every attacker sends it.
    Subclasses choose the distance statistic; the attack then sits at the edge of what a
    distance-based screen can tell from honest spread, whatever the aggregator.
    """

    def direction(self, honest: np.ndarray) -> np.ndarray:
        """Return the perturbation ``-std(honest)`` per coordinate."""
        return -_honest_std(honest)

    def malicious(self, honest: np.ndarray, gamma: float) -> np.ndarray:
        """Return ``mean(honest) + gamma * direction(honest)``."""
        return honest.mean(axis=0) + gamma * self.direction(honest)

    def score(self, malicious: np.ndarray, honest: np.ndarray) -> float:
        """Return the malicious update's distance statistic to the honest updates."""
        raise NotImplementedError

    def bound(self, honest: np.ndarray) -> float:
        """Return the largest value of the statistic among the honest updates."""
        raise NotImplementedError

    def gamma(self, honest: np.ndarray) -> float:
        """Return the largest strength whose malicious update stays within the bound."""
        limit = self.bound(honest)
        return largest_gamma(
            lambda gamma: self.score(self.malicious(honest, gamma), honest) <= limit
        )

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the malicious update at the largest passing strength, for every attacker."""
        honest = _honest(view)
        return _tile(self.malicious(honest, self.gamma(honest)), view.num_attackers)


class MinMax(DistanceBoundedAttack):
    """Min-max: no farther from any honest update than two honest updates are apart.

    The malicious update's largest distance to an honest update is at most the largest
    pairwise distance between honest updates, so a screen on distances to the others
    (Krum-like scores, outlier distances) cannot single it out.
    """

    name = "min-max"

    def score(self, malicious: np.ndarray, honest: np.ndarray) -> float:
        """Return the largest distance from the malicious update to an honest update."""
        return float(cdist(malicious[None, :], honest).max())

    def bound(self, honest: np.ndarray) -> float:
        """Return the largest pairwise distance between honest updates."""
        return float(pdist(honest).max())


class MinSum(DistanceBoundedAttack):
    """Min-sum: squared distances to the honest updates that sum no higher than an honest one's.

    The sum of squared distances from the malicious update to all honest updates is at most
    the largest such sum of an honest update, so a screen on summed distances (Krum's score
    with every neighbour) ranks it no worse than the most remote honest client.
    """

    name = "min-sum"

    def score(self, malicious: np.ndarray, honest: np.ndarray) -> float:
        """Return the sum of squared distances from the malicious update to the honest ones."""
        return float(cdist(malicious[None, :], honest, "sqeuclidean").sum())

    def bound(self, honest: np.ndarray) -> float:
        """Return the largest sum of squared distances from an honest update to the others."""
        return float(squareform(pdist(honest, "sqeuclidean")).sum(axis=1).max())


class MimicSetApart(Attack):
    """Mimic aimed at the honest client a screen would set apart.

    Every attacker copies the honest update least aligned (lowest cosine similarity) with
    the honest mean: the most unusual honest client, such as one holding rare classes.
    This models attackers who amplify a minority, biasing the aggregate towards it, or who
    drag it into being screened out together with them (Karimireddy et al.'s mimic attack
    aimed at a chosen client).
    """

    name = "mimic-set-apart"

    def target_index(self, honest: np.ndarray) -> int:
        """Return the index of the honest update least aligned with the honest mean."""
        norms = np.maximum(np.linalg.norm(honest, axis=1), np.finfo(np.float64).tiny)
        # Cosine similarity up to the honest mean's norm, a positive factor common to all.
        return int(np.argmin(honest @ honest.mean(axis=0) / norms))

    def updates(self, view: RoundView) -> np.ndarray:
        """Return copies of the least-aligned honest update, one per attacker."""
        honest = _honest(view)
        return _tile(honest[self.target_index(honest)], view.num_attackers)


ADAPTIVE_ATTACKS: tuple[type[Attack], ...] = (
    NoisyCopies,
    OwnDeviation,
    MedianNorm,
    MinMax,
    MinSum,
    MimicSetApart,
)
"""The attacks adaptive to the defence, for the bench's ``ATTACKS`` registry."""
