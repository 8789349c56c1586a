"""The bench's attacks, chosen by name from :data:`ATTACKS`.

Model-poisoning attacks are ``byzfl``'s own implementations (EPFL/INRIA's library),
applied to the round's real honest updates: the attackers are omniscient, as in the
ByzFL benchmark, and all of them send the attack's vector. The optimal variants search
the attack's strength against the aggregator under test, given as ``f(vectors) ->
vector`` (for BCSFL, :func:`bcsfl_flower.round.aggregate.screened_mean`), so against
BCSFL they are attacks adaptive to its screening. Data-poisoning attacks train on
poisoned data: label flipping (``y -> 9 - y``) and a pixel-trigger backdoor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import byzfl
import numpy as np

VectorAggregator = Callable[[np.ndarray], np.ndarray]
"""An aggregator as a function of the ``(n, d)`` update matrix."""

ON_OFF_HONEST_ROUNDS = 5
"""Rounds an on-off attacker trains honestly (earning stake) before it attacks."""


@dataclass(frozen=True)
class RoundView:
    """What the attackers know in a round.

    Attributes
    ----------
    server_round : int
        The round (from 1).
    honest : np.ndarray
        ``(h, d)`` the honest clients' updates this round.
    own : np.ndarray
        ``(f, d)`` the attackers' own updates, trained as :meth:`Attack.training` says.
    target : VectorAggregator
        The aggregator under test (its pre-aggregation included).
    rng : np.random.Generator
        The round's randomness.
    """

    server_round: int
    honest: np.ndarray
    own: np.ndarray
    target: VectorAggregator
    rng: np.random.Generator

    @property
    def num_attackers(self) -> int:
        """Number of attackers."""
        return self.own.shape[0]


class Attack:
    """What attackers train on and what they send."""

    name: ClassVar[str]

    def training(self, server_round: int) -> str:
        """Return how attackers train this round: "honest", "flip" or "backdoor"."""
        return "honest"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the ``(f, d)`` updates the attackers send."""
        return view.own


class NoAttack(Attack):
    """Clean: no attacker (a share of 0)."""

    name = "clean"


class LabelFlip(Attack):
    """Train on labels ``y -> 9 - y``."""

    name = "label-flip"

    def training(self, server_round: int) -> str:
        """Return "flip"."""
        return "flip"


class Backdoor(Attack):
    """Train with a pixel trigger that steers any digit to the backdoor's target label."""

    name = "backdoor"

    def training(self, server_round: int) -> str:
        """Return "backdoor"."""
        return "backdoor"


class ByzflAttack(Attack):
    """Send one of ``byzfl``'s attack vectors (computed on the honest updates)."""

    factory: ClassVar[Callable[[], Callable[[np.ndarray], np.ndarray]]]
    per_attacker: ClassVar[bool] = False
    """Draw a fresh vector for each attacker (random attacks)."""

    def updates(self, view: RoundView) -> np.ndarray:
        """Return byzfl's vector for every attacker."""
        attack = self.factory()
        if self.per_attacker:
            return np.stack([_vector(attack(view.honest)) for _ in range(view.num_attackers)])
        return np.tile(_vector(attack(view.honest)), (view.num_attackers, 1))


def _vector(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).ravel()


class Alie(ByzflAttack):
    """A little is enough (Baruch et al. 2019), byzfl's default tau 1.5."""

    name = "alie"
    factory = staticmethod(lambda: byzfl.ALittleIsEnough())


class IpmWeak(ByzflAttack):
    """Inner-product manipulation (Xie et al. 2020) at epsilon 0.1."""

    name = "ipm-0.1"
    factory = staticmethod(lambda: byzfl.InnerProductManipulation(tau=0.1))


class IpmStrong(ByzflAttack):
    """Inner-product manipulation at byzfl's default strength, epsilon 2."""

    name = "ipm-2"
    factory = staticmethod(lambda: byzfl.InnerProductManipulation(tau=2.0))


class Mimic(ByzflAttack):
    """Every attacker copies the same honest client (Karimireddy et al. 2022)."""

    name = "mimic"
    factory = staticmethod(lambda: byzfl.Mimic(epsilon=0))


class Inf(ByzflAttack):
    """Send infinite values."""

    name = "inf"
    factory = staticmethod(lambda: byzfl.Inf())


class SignFlip(ByzflAttack):
    """Send the negated honest mean."""

    name = "sign-flip"
    factory = staticmethod(lambda: byzfl.SignFlipping())


class Gaussian(ByzflAttack):
    """Send N(0, 1) noise, a fresh draw per attacker."""

    name = "gaussian"
    factory = staticmethod(lambda: byzfl.Gaussian(mu=0.0, sigma=1.0))
    per_attacker = True


class OptimalAttack(Attack):
    """byzfl's optimal ALIE or IPM, tuned each round against the aggregator under test."""

    optimiser: ClassVar[type]

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the strength that moves the target's aggregate furthest from the honest mean."""
        attack = self.optimiser(agg=view.target, pre_agg_list=[], f=view.num_attackers)
        return np.tile(_vector(attack(view.honest)), (view.num_attackers, 1))


class OptimalAlie(OptimalAttack):
    """ALIE with byzfl's strength search against the aggregator under test."""

    name = "opt-alie"
    optimiser = byzfl.Optimal_ALittleIsEnough


class OptimalIpm(OptimalAttack):
    """IPM with byzfl's strength search against the aggregator under test."""

    name = "opt-ipm"
    optimiser = byzfl.Optimal_InnerProductManipulation


class OnOff(Attack):
    """Honest for :data:`ON_OFF_HONEST_ROUNDS` rounds (earning stake), then sign flipping."""

    name = "on-off"

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the own honest updates, then the negated honest mean."""
        if view.server_round <= ON_OFF_HONEST_ROUNDS:
            return view.own
        return SignFlip().updates(view)


ATTACKS: Mapping[str, type[Attack]] = {
    attack.name: attack
    for attack in (
        NoAttack,
        LabelFlip,
        Backdoor,
        Alie,
        IpmWeak,
        IpmStrong,
        OptimalAlie,
        OptimalIpm,
        Mimic,
        Inf,
        SignFlip,
        Gaussian,
        OnOff,
    )
}
"""Attacks by name."""
