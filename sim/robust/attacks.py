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

Decision = Callable[[np.ndarray], np.ndarray]
"""The whole round of the strategy under test as a function of the attackers' ``(f, d)``
updates: the step it commits, validators and all (what an optimiser against the whole
decision probes)."""

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
    decide : Decision, optional
        The strategy's whole round on a copy of its state (see :data:`Decision`).
    """

    server_round: int
    honest: np.ndarray
    own: np.ndarray
    target: VectorAggregator
    rng: np.random.Generator
    decide: Decision | None = None

    @property
    def num_attackers(self) -> int:
        """Number of attackers."""
        return self.own.shape[0]


@dataclass(frozen=True)
class BallotView:
    """What a Byzantine validator knows when it scores one model.

    Attributes
    ----------
    server_round : int
        The round.
    loss : float
        The model's true loss on the validator's held-out data.
    baseline : float
        ``w_t``'s true loss on the same data.
    is_global : bool
        Whether the model is ``w_t`` itself.
    objective : Callable[[], float]
        The model's loss on the attackers' own objective (their flipped labels).
    """

    server_round: int
    loss: float
    baseline: float
    is_global: bool
    objective: Callable[[], float]


class Attack:
    """What attackers train on, what they send and how they vote as validators."""

    name: ClassVar[str]
    measures_backdoor: ClassVar[bool] = False
    """Whether the run measures a backdoor's success (the trigger's attacks)."""

    def training(self, server_round: int) -> str:
        """Return how attackers train: "honest", "flip", "backdoor" or "dba"."""
        return "honest"

    def begin_round(self, server_round: int, seats: int) -> None:
        """Learn the round's committee before training: ``seats`` attacker validators.

        The committee seed is public before clients train (previous model hash and
        round), so attackers can predict the draw; only sleepers use it.
        """

    def updates(self, view: RoundView) -> np.ndarray:
        """Return the ``(f, d)`` updates the attackers send."""
        return view.own

    def ballot(self, view: BallotView) -> float | None:
        """Return the loss a Byzantine validator reports (None: it withholds its ballot).

        By default the attackers collude: ``2 L(w_t) - L(model)`` accepts what hurts
        and rejects what helps.
        """
        return max(0.0, 2.0 * view.baseline - view.loss)


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
    measures_backdoor = True

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


BASE_ATTACKS: Mapping[str, type[Attack]] = {
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
"""byzfl's attacks and the data-poisoning ones, by name.

:data:`sim.robust.threats.ATTACKS` adds the attacks adapted to BCSFL's rule."""
