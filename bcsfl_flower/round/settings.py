"""The settings of a round, each validated once, when the strategy is built.

A bad value raises :class:`SettingError`, which names the setting, so the Python API
(``BCSFL(...)``) and the run config (:mod:`bcsfl_flower.config`, which reports the
kebab-case key) share one set of rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bcsfl_flower.round.bounds import EXAMPLE_CAP_RATIO
from bcsfl_flower.round.screening import OUTLIER_NORM_RATIO, SPLIT_MARGIN

DEFAULT_REWARD = 0.05
"""Stake a trusted client gains in a committed round."""

DEFAULT_SLASH_FRACTION = 0.5
"""Share of its stake a rejected client loses."""

DEFAULT_LEFT_OUT_FRACTION = 0.1
"""Share of its stake a set-apart client loses when the validators leave it out.

Lighter than a rejection: on skewed data an honest group with classes of its own is
left out in some rounds (up to a quarter of them on the bench's alpha-0.1 federations),
and a half-stake slash each time compounded to 1/32 within 20 rounds, too little to
count even when kept: the clean federation ended 5 points under FedAvg. At a tenth (a
fifth measured 0.8 points lower), the rewards of the rounds it is kept outweigh it,
while a group left out every round falls to a third of its stake in ten rounds and to
an eighth in twenty."""

DEFAULT_STAKE_CEILING = 2.0
"""Largest stake a reward can lift a client to, as a multiple of the median stake.

Without a ceiling, rewards compound with slashes elsewhere: on the bench's skewed
logistic-regression federations a few clients ended with 7 to 1000 times the median
stake and drew most committee seats. Twice the median keeps a stake majority of honest
clients (attackers are slashed towards zero) while no client can outweigh two others."""


class SettingError(ValueError):
    """A round setting is out of range.

    Attributes
    ----------
    setting : str
        The snake_case name of the setting (the run config's key with ``-``).
    detail : str
        What is wrong, e.g. ``"must be >= 1, got 0"``.
    """

    def __init__(self, setting: str, detail: str) -> None:
        super().__init__(f"{setting} {detail}")
        self.setting = setting
        self.detail = detail


def _require(condition: bool, setting: str, detail: str) -> None:
    if not condition:
        raise SettingError(setting, detail)


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class StakePolicy:
    """How a round changes stakes.

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

    def __post_init__(self) -> None:
        _require(
            _finite(self.reward) and self.reward >= 0,
            "stake_reward",
            f"must be >= 0, got {self.reward}",
        )
        _require(
            _finite(self.slash_fraction) and 0.0 <= self.slash_fraction < 1.0,
            "stake_slash",
            f"must be in [0, 1), got {self.slash_fraction}",
        )
        _require(
            _finite(self.left_out_fraction) and 0.0 <= self.left_out_fraction < 1.0,
            "stake_left_out",
            f"must be in [0, 1), got {self.left_out_fraction}",
        )
        _require(
            _finite(self.ceiling) and self.ceiling >= 1.0,
            "stake_ceiling",
            f"must be >= 1, got {self.ceiling}",
        )


@dataclass(frozen=True)
class ValidationSettings:
    """How validators are asked and read.

    Attributes
    ----------
    loss_metric_key : str
        Key of the loss in the validators' evaluate replies.
    timeout : float
        Seconds to wait; a validator that has not answered by then abstains.
    arrayrecord_key, configrecord_key : str
        Record names of the evaluate messages (the strategy's FedAvg arguments).
    """

    loss_metric_key: str = "eval_loss"
    timeout: float = 600.0
    arrayrecord_key: str = "arrays"
    configrecord_key: str = "config"

    def __post_init__(self) -> None:
        _require(bool(self.loss_metric_key), "loss_metric_key", "must not be empty")
        _require(
            _finite(self.timeout) and self.timeout > 0,
            "committee_timeout",
            f"must be > 0, got {self.timeout}",
        )


@dataclass(frozen=True)
class RoundSettings:
    """Everything a round is configured with, validated once at start-up.

    Attributes
    ----------
    num_validators, num_miners : int
        Committee seats (>= 1), clamped to the trusted clients with stake.
    vote_tolerance : float
        Loss increase a validator tolerates when it accepts a candidate (>= 0).
    noisy_updates : bool
        Updates carry DP noise: screening compares them by their inner-product
        profiles (:class:`~bcsfl_flower.round.screening.ProfileDirections`) and the
        committee scores the trusted mean's sampling error
        (:mod:`bcsfl_flower.round.noise_reference`). Screening then splits with
        :data:`~bcsfl_flower.round.screening.NOISY_SPLIT_MARGIN`, not ``split_margin``.
    split_margin : float
        Screening's direction test (>= 0).
    example_cap_ratio : float
        Example counts are capped at this multiple of the round's median (>= 1).
    stake_policy : StakePolicy
        Rewards and slashes.
    weighted_by_key : str
        MetricRecord key of the example count (FedAvg's ``weighted_by_key``).
    validation : ValidationSettings
        How validators are asked and read.
    """

    num_validators: int = 5
    num_miners: int = 5
    vote_tolerance: float = 0.05
    noisy_updates: bool = False
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO
    split_margin: float = SPLIT_MARGIN
    example_cap_ratio: float = EXAMPLE_CAP_RATIO
    stake_policy: StakePolicy = field(default_factory=StakePolicy)
    weighted_by_key: str = "num-examples"
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __post_init__(self) -> None:
        for name in ("num_validators", "num_miners"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                name,
                f"must be an int >= 1, got {value!r}",
            )
        checks = (
            ("vote_tolerance", 0.0, "must be >= 0"),
            ("split_margin", 0.0, "must be >= 0"),
            ("example_cap_ratio", 1.0, "must be >= 1"),
        )
        for name, low, detail in checks:
            value = getattr(self, name)
            _require(_finite(value) and value >= low, name, f"{detail}, got {value!r}")
        _require(
            _finite(self.outlier_norm_ratio) and self.outlier_norm_ratio > 1,
            "outlier_norm_ratio",
            f"must be > 1, got {self.outlier_norm_ratio!r}",
        )
