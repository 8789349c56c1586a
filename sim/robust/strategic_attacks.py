"""Attacks on the rest of BCSFL's round: its committee, its validators and its decision.

The attacks of :mod:`sim.robust.attacks` and :mod:`sim.robust.adaptive_attacks` shape
updates. These use what only BCSFL exposes:

- **sleepers** know the committee before they train (its seed is the previous model's
  hash and the round), behave until they would hold two validator seats, and attack in
  exactly those rounds;
- **strategic validators** reject every candidate, withhold their ballots, or score
  candidates on their own poisoned objective (so they accept their own group's mean);
- **the decision optimiser** searches attack vectors against a copy of the strategy's
  whole round (screen, candidates, committee and the validators' real losses), not
  against a stand-in for its screen;
- **backdoors** that avoid the screen: a distributed trigger (DBA, one quadrant per
  attacker) and a norm-constrained one (projected onto the honest median norm).
"""

from __future__ import annotations

import byzfl
import numpy as np

from sim.robust.attacks import Attack, BallotView, RoundView

SLEEPER_SEATS = 2
"""Validator seats the sleepers wait for: two of a committee of five block a 2/3 quorum."""

REJECTING_LOSS_GROWTH = 0.5
"""How much worse than ``w_t`` a rejecting validator says every candidate is (relative)."""

OPTIMISER_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Lengths the decision optimiser tries, as multiples of the median honest norm."""


class Sleeper(Attack):
    """Honest until the draw gives the attackers two validator seats; then ALIE and collusion.

    In an active round the attackers send byzfl's ALIE vector (small enough to stay in
    the committee pool) and, as validators, vote the colluding way; in every other
    round they train and vote honestly, earning stake.
    """

    name = "sleeper"

    def __init__(self) -> None:
        self.active = False

    def begin_round(self, server_round: int, seats: int) -> None:
        """Attack in this round only if the attackers hold enough validator seats."""
        self.active = seats >= SLEEPER_SEATS

    def updates(self, view: RoundView) -> np.ndarray:
        """Return ALIE copies when active, else the honest updates."""
        if not self.active:
            return view.own
        vector = np.asarray(byzfl.ALittleIsEnough()(view.honest), dtype=np.float64).ravel()
        return np.tile(vector, (view.num_attackers, 1))

    def ballot(self, view: BallotView) -> float | None:
        """Collude when active, else report the true loss."""
        return super().ballot(view) if self.active else view.loss


class ValidatorsReject(Attack):
    """Train honestly (so they are drawn), and as validators reject every candidate."""

    name = "validators-reject"

    def ballot(self, view: BallotView) -> float | None:
        """Report ``w_t``'s true loss, and every other model as much worse."""
        if view.is_global:
            return view.loss
        return view.baseline * (1.0 + REJECTING_LOSS_GROWTH) + REJECTING_LOSS_GROWTH


class ValidatorsWithhold(Attack):
    """Flip labels, and as validators never answer."""

    name = "validators-withhold"

    def training(self, server_round: int) -> str:
        """Return "flip"."""
        return "flip"

    def ballot(self, view: BallotView) -> float | None:
        """Withhold the ballot."""
        return None


class ValidatorsOwnGroup(Attack):
    """Flip labels, and as validators score every model on the flipped labels.

    The candidates that carry the group's own updates lower that loss, so the group's
    validators accept the federation mean with them in it and reject the rest.
    """

    name = "validators-own-group"

    def training(self, server_round: int) -> str:
        """Return "flip"."""
        return "flip"

    def ballot(self, view: BallotView) -> float | None:
        """Report the loss on the attackers' objective."""
        return view.objective()


class DecisionOptimiser(Attack):
    """Search the attack that moves the strategy's committed step furthest from the honest mean.

    The candidates are Shejwalkar and Houmansadr's three perturbations (the inverse unit
    mean, the inverse standard deviation, the inverse sign) added to the honest mean at
    :data:`OPTIMISER_SCALES` lengths; each is played against a copy of the strategy's
    round (:attr:`RoundView.decide`), and the one whose committed step lies furthest
    from the honest mean is sent. The attackers are omniscient, as in the ByzFL
    benchmark: they see the honest updates and the validators' answers.
    """

    name = "decision-optimiser"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the copies of the most damaging candidate."""
        honest_mean = view.honest.mean(axis=0)
        scale = float(np.median(np.linalg.norm(view.honest, axis=1)))
        decide = view.decide or view.target
        best, damage = view.own, -1.0
        for direction in _perturbations(view.honest):
            for factor in OPTIMISER_SCALES:
                candidate = np.tile(
                    honest_mean + factor * scale * direction, (view.num_attackers, 1)
                )
                with np.errstate(all="ignore"):
                    step = np.asarray(decide(candidate), dtype=np.float64)
                moved = float(np.linalg.norm(step - honest_mean))
                if np.isfinite(moved) and moved > damage:
                    best, damage = candidate, moved
        return best


def _perturbations(honest: np.ndarray) -> list[np.ndarray]:
    """Return the unit inverse-mean, inverse-std and inverse-sign directions."""
    mean = honest.mean(axis=0)
    directions = [-mean, -honest.std(axis=0), -np.sign(mean)]
    return [d / n for d in directions if (n := float(np.linalg.norm(d))) > 0]


class Dba(Attack):
    """Distributed backdoor (Xie et al., ICLR 2020): each attacker trains one trigger quadrant."""

    name = "dba"
    measures_backdoor = True

    def training(self, server_round: int) -> str:
        """Return "dba" (the bench gives attacker ``i`` quadrant ``i mod 4``)."""
        return "dba"


class ProjectedBackdoor(Attack):
    """The pixel-trigger backdoor, each update projected onto the honest median norm.

    Constrain-and-scale (Bagdasaryan et al. 2020) and PGD backdoors keep their update
    inside the range a norm-based defence accepts; this is the norm half of that.
    """

    name = "backdoor-projected"
    measures_backdoor = True

    def training(self, server_round: int) -> str:
        """Return "backdoor"."""
        return "backdoor"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the backdoored updates, longer ones scaled down to the honest median norm."""
        radius = float(np.median(np.linalg.norm(view.honest, axis=1)))
        norms = np.linalg.norm(view.own, axis=1, keepdims=True)
        factor = np.minimum(1.0, radius / np.maximum(norms, 1e-12))
        return view.own * factor


STRATEGIC_ATTACKS = (
    Sleeper,
    ValidatorsReject,
    ValidatorsWithhold,
    ValidatorsOwnGroup,
    DecisionOptimiser,
    Dba,
    ProjectedBackdoor,
)
"""This module's attacks (registered in :data:`sim.robust.threats.ATTACKS`)."""
