"""Stake: the federation's memory of who helped and who poisoned.

Stake weighs three things every round: the committee draw
(:mod:`bcsfl_flower.committee`), the aggregate (:mod:`bcsfl_flower.round.bounds`) and
which cluster the screen trusts (:mod:`bcsfl_flower.round.screening`). A round settles
it once, at the end (:func:`settle`):

* **Slash hard**: every client rejected by a check or by screening loses
  ``slash_fraction`` of its stake (half, by default), so two rejections cut a client to
  a quarter. When a round rolls back, the trusted clients its most robust candidate
  left out are slashed too, so the next round differs from the one that failed.
* **Doubt lightly**: a client the screen only set apart (different, not provably
  coordinated) and the validators then left out loses ``left_out_fraction`` (a tenth)
  of its stake: honest groups with their own classes are left out now and then.
* **Reward slowly, up to a ceiling**: in a committed round, each trusted client gains
  ``reward`` (0.05 of an initial stake, by default), but no reward lifts a stake above
  ``ceiling`` (2) times the round's median stake; a slashed client needs ten honest
  rounds to recover, and nobody can accumulate the committee.
  A rolled-back round rewards nobody. Rewards go to the whole trusted cluster, not
  only to the committed candidate's support: a reward that favoured half of a split
  federation would decide, by accident, which half is trusted next.

This asymmetry is what lets BCSFL hold where no stateless aggregator can: once
attackers have been caught a few times, the honest clients hold most of the stake
even if they are only half of the clients. The stake table before and after every
round is part of the round record.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from eth_utils import is_address, to_checksum_address

from bcsfl_flower.round.bounds import EXAMPLE_CAP_RATIO
from bcsfl_flower.round.state import Contribution, Settlement

DEFAULT_REWARD = 0.05
"""Stake a trusted client gains in a committed round."""

DEFAULT_SLASH_FRACTION = 0.5
"""Share of its stake a rejected client loses."""

DEFAULT_LEFT_OUT_FRACTION = 0.1
"""Share of its stake a set-apart client loses when the validators leave it out.

Lighter than a rejection: on skewed data an honest group with classes of its own is
left out in some rounds, and a half-stake slash each time compounds to 1/32 within 20
rounds, too little to count even when kept. At a tenth, the rewards of the rounds it is
kept outweigh it, while a group left out every round falls to a third of its stake in
ten rounds and to an eighth in twenty. Measurements: ``docs/constants.md``."""

DEFAULT_STAKE_CEILING = 2.0
"""Largest stake a reward can lift a client to, as a multiple of the median stake.

Without a ceiling, rewards compound with slashes elsewhere, and on skewed data a few
clients come to hold most of the stake and draw most committee seats
(``docs/constants.md``). Twice the median keeps a stake majority of honest
clients (attackers are slashed towards zero) while no client can outweigh two others."""


@dataclass(frozen=True)
class StakePolicy:
    """How a round changes stakes.

    Built from validated settings (:attr:`RoundSettings.stake_policy
    <bcsfl_flower.round.settings.RoundSettings.stake_policy>`), which check each value once.

    Attributes
    ----------
    reward : float
        Added to each supporting client's stake in a committed round (>= 0).
    slash_fraction : float
        Share of its stake a rejected or suspected client loses, in [0, 1).
    ceiling : float
        A reward lifts no stake above this multiple of the round's median stake (>= 1).
    left_out_fraction : float
        Share of its stake a set-apart client loses when the validators leave it out,
        in [0, 1).
    """

    reward: float = DEFAULT_REWARD
    slash_fraction: float = DEFAULT_SLASH_FRACTION
    ceiling: float = DEFAULT_STAKE_CEILING
    left_out_fraction: float = DEFAULT_LEFT_OUT_FRACTION


class StakeLedger:
    """Stakes of the federation's participants, keyed by node id (as ``str``).

    Parameters
    ----------
    stakes : Mapping[str, float], optional
        Initial stakes (finite, >= 0).
    """

    def __init__(self, stakes: Mapping[str, float] | None = None) -> None:
        self._stakes: dict[str, float] = {}
        for participant, stake in (stakes or {}).items():
            self.register(participant, stake)

    def __contains__(self, participant: object) -> bool:
        return participant in self._stakes

    def __len__(self) -> int:
        return len(self._stakes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stakes)

    def __repr__(self) -> str:
        return f"StakeLedger({self._stakes!r})"

    def stake(self, participant: str) -> float:
        """Return one participant's stake (``KeyError`` if unknown)."""
        return self._stakes[self._known(participant)]

    def stakes_for(self, participants: Iterable[str]) -> np.ndarray:
        """Return the stakes of ``participants`` as a float64 array, in the order given."""
        return np.array([self.stake(p) for p in participants], dtype=np.float64)

    def total(self) -> float:
        """Return the sum of all stakes."""
        return math.fsum(self._stakes.values())

    def as_dict(self) -> dict[str, float]:
        """Return a snapshot ``{participant: stake}``, sorted by id."""
        return {participant: self._stakes[participant] for participant in sorted(self._stakes)}

    def register(self, participant: str, stake: float) -> None:
        """Add a new participant.

        Raises
        ------
        ValueError
            If it is already registered (re-registering would reset a slashed stake), or
            the stake is negative or not finite.
        """
        if not isinstance(participant, str) or not participant:
            raise TypeError(f"participant ids must be non-empty str, got {participant!r}")
        value = float(stake)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"stake of {participant!r} must be finite and >= 0, got {stake!r}")
        if participant in self._stakes:
            raise ValueError(f"participant {participant!r} is already registered")
        self._stakes[participant] = value

    def apply(self, settlement: Settlement) -> None:
        """Set every stake a round's settlement changed."""
        for participant, stake in settlement.after.items():
            self._stakes[self._known(participant)] = stake

    def _known(self, participant: str) -> str:
        if participant not in self._stakes:
            raise KeyError(f"participant {participant!r} is not registered in the stake ledger")
        return participant


@dataclass(frozen=True)
class StakeChanges:
    """Whom a round rewards, slashes and lightly slashes (:func:`stake_changes`).

    Keys are whatever the caller keys stakes by: node ids in the round, identities in
    a replay of its statement.
    """

    rewarded: tuple[str, ...] = ()
    slashed: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()


def stake_changes(
    *,
    trusted: Collection[str],
    set_apart: Collection[str],
    rejected: Collection[str],
    support: Collection[str],
    suspects: Collection[str],
    committed: bool,
) -> StakeChanges:
    """Return whom a round's outcome rewards and slashes (the rules of the module docstring).

    The round calls this with node ids; an auditor or a resumed run calls it with the
    identities of the anchored statement (:func:`~bcsfl_flower.round.statement.stated_changes`),
    so a stake table is re-derived by the very same rules that set it.

    Parameters
    ----------
    trusted, set_apart : Collection[str]
        The screen's trusted clients, and those it set apart.
    rejected : Collection[str]
        Every client rejected by a check or by screening; the set-apart ones in it are
        left out (a lighter slash) or spared, never slashed in full.
    support : Collection[str]
        Whom the decided candidate drew on (empty for a rollback).
    suspects : Collection[str]
        Whom a rollback suspects (slashed only when the round rolled back).
    committed : bool
        Whether the round committed a model (a rollback rewards nobody).
    """
    spared = set(set_apart) | set(support)
    slashed = [c for c in rejected if c not in spared]
    if not committed:
        return StakeChanges(slashed=tuple(sorted({*slashed, *suspects})))
    return StakeChanges(
        rewarded=tuple(sorted({*trusted, *(set(set_apart) & set(support))})),
        slashed=tuple(sorted(slashed)),
        left_out=tuple(sorted(set(set_apart) - set(support))),
    )


def settle(before: Mapping[str, float], changes: StakeChanges, policy: StakePolicy) -> Settlement:
    """Return the stake table after a round.

    Slashing wins over rewarding: a client in both lists (it cannot be, in a round the
    pipeline settles) is only slashed. Unknown ids are ignored: a reply rejected before
    its sender was ever registered has no stake to lose. A reward stops at
    ``policy.ceiling`` times the median stake before the round (a stake already above
    it is not cut, only not raised). Clients left out (set apart by the screen, then
    left out by the validators) lose ``policy.left_out_fraction`` instead.
    """
    slashed_ids = sorted({p for p in changes.slashed if p in before})
    light_ids = sorted({p for p in changes.left_out if p in before} - set(slashed_ids))
    rewarded_ids = sorted(
        {p for p in changes.rewarded if p in before} - set(slashed_ids) - set(light_ids)
    )
    after = dict(before)
    ceiling = policy.ceiling * float(np.median(list(before.values()))) if before else 0.0
    for participant in rewarded_ids:
        raised = min(before[participant] + policy.reward, ceiling)
        after[participant] = max(before[participant], raised)
    for participant in slashed_ids:
        after[participant] = before[participant] * (1.0 - policy.slash_fraction)
    for participant in light_ids:
        after[participant] = before[participant] * (1.0 - policy.left_out_fraction)
    return Settlement(
        before=dict(before),
        after=after,
        rewarded=tuple(rewarded_ids),
        slashed=tuple(sorted([*slashed_ids, *light_ids])),
    )


class InitialStake:
    """The stake a client gets when the ledger first sees it (``initial-stake``)."""

    name: ClassVar[str]

    def __init__(self, table: Mapping[str, float] | None = None) -> None:
        self.table = {
            to_checksum_address(key) if is_address(key) else str(key): float(stake)
            for key, stake in (table or {}).items()
        }

    def __call__(self, contribution: Contribution, typical_examples: float) -> float:
        """Return ``contribution``'s initial stake; ``table`` entries win.

        The table is keyed by client address (proved by a signed packet) or by node id.
        """
        for key in (contribution.address, contribution.name):
            if key is not None and key in self.table:
                return float(self.table[key])
        return self.default(contribution, typical_examples)

    def default(self, contribution: Contribution, typical_examples: float) -> float:
        """Return the stake of a client the table does not name."""
        return 1.0


class EqualStake(InitialStake):
    """Every client starts with stake 1."""

    name = "equal"


class DataSizeStake(InitialStake):
    """A client starts with its example count, capped like its aggregation weight.

    The count is the client's own claim, so it is capped at
    :data:`~bcsfl_flower.round.bounds.EXAMPLE_CAP_RATIO` times the round's median count:
    claiming 1e300 examples buys no more stake than the median client's.
    """

    name = "data-size"

    def default(self, contribution: Contribution, typical_examples: float) -> float:
        """Return the capped example count."""
        return float(min(contribution.num_examples, EXAMPLE_CAP_RATIO * typical_examples))


class ExplicitStake(InitialStake):
    """Stakes from the table (clients it does not name start with 1)."""

    name = "explicit"


INITIAL_STAKES: Mapping[str, type[InitialStake]] = {
    rule.name: rule for rule in (EqualStake, DataSizeStake, ExplicitStake)
}
"""Initial-stake rules by name (run config ``initial-stake``)."""
