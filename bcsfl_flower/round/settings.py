"""The settings of a round: every default and every check, in one place.

:class:`RoundSettings` is the one source the strategy (``BCSFL(settings, ...)`` or its
keyword shorthand), the run config (:meth:`bcsfl_vision.config.RunSettings.round_settings`)
and the docs read. Each field's rule is a line of :data:`ROUND_CONSTRAINTS`, checked once
when the settings are built, so a bad value raises one
:class:`~bcsfl_flower.round.constraints.SettingError` that names the setting, whichever
way it came in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from bcsfl_flower.round.bounds import EXAMPLE_CAP_RATIO
from bcsfl_flower.round.constraints import (
    Boolean,
    Constraint,
    Interval,
    NonEmptyString,
    OneOf,
    SettingError,
    validate_parameters,
)
from bcsfl_flower.round.screening import OUTLIER_NORM_RATIO, SPLIT_MARGIN
from bcsfl_flower.round.selection import SELECTION_RULES, selection_rule
from bcsfl_flower.round.stakes import (
    DEFAULT_LEFT_OUT_FRACTION,
    DEFAULT_REWARD,
    DEFAULT_SLASH_FRACTION,
    DEFAULT_STAKE_CEILING,
    INITIAL_STAKES,
    StakePolicy,
)

__all__ = ["ROUND_CONSTRAINTS", "RoundSettings", "SettingError", "StakePolicy"]

_FRACTION = Interval(0.0, 1.0, high_open=True)
_NON_NEGATIVE = Interval(0.0)

ROUND_CONSTRAINTS: Mapping[str, Constraint] = {
    "selection": OneOf(lambda: SELECTION_RULES),
    "num_validators": Interval(1, integer=True),
    "num_miners": Interval(1, integer=True),
    "initial_stake": OneOf(lambda: INITIAL_STAKES),
    "stake_reward": _NON_NEGATIVE,
    "stake_slash": _FRACTION,
    "stake_ceiling": Interval(1.0),
    "stake_left_out": _FRACTION,
    "vote_tolerance": _NON_NEGATIVE,
    "noisy_updates": Boolean(),
    "outlier_norm_ratio": Interval(1.0, low_open=True),
    "split_margin": _NON_NEGATIVE,
    "example_cap_ratio": Interval(1.0),
    "loss_metric_key": NonEmptyString(),
    "committee_timeout": Interval(0.0, low_open=True),
    "ckks": Boolean(),
}
"""What each :class:`RoundSettings` field accepts (scikit-learn's ``_parameter_constraints``)."""


@dataclass(frozen=True)
class RoundSettings:
    """Everything a BCSFL round is configured with, validated once when built.

    Attributes
    ----------
    selection : {"trusted-mean", "paper"}
        ``"trusted-mean"``: the validators score the trusted cluster's mean, the mean of
        its core and its geometric median; the best that reaches the quorum commits.
        ``"paper"``: every trusted local model is a candidate and the first validator
        drawn proposes its best one for a PBFT accept/reject vote.
    num_validators, num_miners : int
        Committee seats (>= 1), clamped to the trusted clients with stake.
    initial_stake : {"equal", "data-size", "explicit"}
        Stake a client gets when first seen: 1.0, its (capped) example count, or its
        entry in the strategy's ``initial_stakes``.
    stake_reward : float
        Stake each trusted client gains in a committed round (>= 0).
    stake_slash : float
        Share of its stake a rejected client loses, in [0, 1).
    stake_ceiling : float
        A reward lifts no stake above this multiple of the median stake (>= 1).
    stake_left_out : float
        Share of its stake a set-apart client loses when the validators leave it out,
        in [0, 1).
    vote_tolerance : float
        Loss increase a validator tolerates when it accepts a candidate (absorbs
        evaluation noise on non-IID data; >= 0).
    noisy_updates : bool
        The clients train with differential privacy, so noise dominates every update.
        Screening then compares updates by their inner products with the others, which
        the noise leaves unbiased, and splits with
        :data:`~bcsfl_flower.round.screening.NOISY_SPLIT_MARGIN`, not ``split_margin``;
        and the validators also score the trusted mean's sampling error
        (:mod:`bcsfl_flower.round.noise_reference`).
    outlier_norm_ratio : float
        Screening rejects updates longer than this multiple of the stake-weighted median
        norm (> 1).
    split_margin : float
        How clearly two groups of updates must differ before screening splits them
        (>= 0).
    example_cap_ratio : float
        Example counts are capped at this multiple of the round's median (>= 1).
    loss_metric_key : str
        Key of the loss in the validators' evaluate replies.
    committee_timeout : float
        Seconds to wait for validators (and CKKS key holders) (> 0).
    ckks : bool
        CKKS mode: clients running ``bcsfl_ckks_client_app`` send ``Enc(w_k - w_t)``; the
        server holds only the public context, screens on the Gram matrix a stake-drawn
        committee of key holders decrypts, and aggregates ciphertexts.
    """

    selection: str = "trusted-mean"
    num_validators: int = 5
    num_miners: int = 5
    initial_stake: str = "equal"
    stake_reward: float = DEFAULT_REWARD
    stake_slash: float = DEFAULT_SLASH_FRACTION
    stake_ceiling: float = DEFAULT_STAKE_CEILING
    stake_left_out: float = DEFAULT_LEFT_OUT_FRACTION
    vote_tolerance: float = 0.05
    noisy_updates: bool = False
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO
    split_margin: float = SPLIT_MARGIN
    example_cap_ratio: float = EXAMPLE_CAP_RATIO
    loss_metric_key: str = "eval_loss"
    committee_timeout: float = 600.0
    ckks: bool = False

    def __post_init__(self) -> None:
        validate_parameters(self, ROUND_CONSTRAINTS)
        # The one check that spans two fields: CKKS hides single updates.
        selection_rule(self.selection, encrypted=self.ckks)

    def split_keywords(self, keywords: Mapping[str, Any]) -> tuple[RoundSettings, dict[str, Any]]:
        """Return these settings with the keywords that name one applied, and the rest.

        Lets ``BCSFL(num_validators=7, fraction_train=0.5)`` stand for
        ``BCSFL(RoundSettings(num_validators=7), fraction_train=0.5)``; the result is
        validated like any other :class:`RoundSettings`.
        """
        names = {field.name for field in fields(self)}
        ours = {key: value for key, value in keywords.items() if key in names}
        rest = {key: value for key, value in keywords.items() if key not in names}
        return replace(self, **ours), rest

    @property
    def stake_policy(self) -> StakePolicy:
        """How a round changes stakes, from the ``stake_*`` settings."""
        return StakePolicy(
            self.stake_reward, self.stake_slash, self.stake_ceiling, self.stake_left_out
        )
