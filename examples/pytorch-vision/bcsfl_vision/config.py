"""Typed run configuration for the bcsfl-flower app.

Flower hands every app its run config as a flat mapping of kebab-case keys (the
``[tool.flwr.app.config]`` table, overridden with ``flwr run --run-config``). This
module reads that mapping exactly once into a frozen dataclass so that the rest of
the code works with typed, validated values, and so that a mistyped value fails at
start-up with a message naming the offending key instead of deep inside a round.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcsfl_flower.extras import MissingExtraError, require_extra
from bcsfl_flower.round.constraints import (
    Boolean,
    Constraint,
    Interval,
    OneOf,
    SettingError,
    Text,
    validate_parameters,
)
from bcsfl_flower.round.settings import ROUND_CONSTRAINTS, RoundSettings
from bcsfl_vision.baselines import BASELINES
from bcsfl_vision.byzfl_strategy import BYZFL_BASELINES

DATA_DIR_ENV = "BCSFL_DATA_DIR"
"""Environment variable that names the data directory when ``data-dir`` is empty."""

OUTPUT_DIR_ENV = "BCSFL_OUTPUT_DIR"
"""Environment variable that names the output directory when ``output-dir`` is empty."""

DATASETS = ("mnist", "cifar10")
ATTACKS = ("label-flip", "sign-flip", "gaussian-noise", "scale")
FAULTS = ("none", "raise", "silent")
"""Simulated client faults (run config ``fault``): raise in ``train``, or answer too late."""
STRATEGIES = ("bcsfl", *BASELINES)


class ConfigError(ValueError):
    """A run-config value is missing, has the wrong type, or is out of range."""


@dataclass(frozen=True)
class AbsolutePathOrEmpty(Constraint):
    """A path the ServerApp can open whatever its working directory, or ``""`` (unset)."""

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` is ``""`` or an absolute path."""
        return isinstance(value, str) and (value == "" or Path(value).is_absolute())

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return "an absolute path (the ServerApp runs in the SuperLink's working directory)"


@dataclass(frozen=True)
class ChainName(Constraint):
    """Where the audit chain runs: the run's own (embedded, anvil), none, or a node's URL."""

    def accepts(self, value: Any) -> bool:
        """Return whether ``value`` names a chain."""
        return isinstance(value, str) and (
            value in ("embedded", "anvil", "none") or value.startswith(("http://", "https://"))
        )

    def describe(self) -> str:
        """Return the requirement, as it completes "must be ..."."""
        return "'embedded', 'anvil', 'none' or an http(s):// URL"


_ROUND = RoundSettings()
"""The round settings' defaults: the run config's round keys default to them."""

_POSITIVE = Interval(0.0, low_open=True)
_NON_NEGATIVE = Interval(0.0)
_COUNT = Interval(1, integer=True)
_INDEX = Interval(0, integer=True)


@dataclass(frozen=True)
class RunSettings:
    """Every run-config key of the app, typed and validated.

    Attribute names are the snake_case form of the kebab-case keys in
    ``[tool.flwr.app.config]``. The round's keys are :class:`RoundSettings` fields under
    the same names (``dp`` sets ``noisy_updates``), with its defaults and its checks;
    :meth:`round_settings` is the one place that maps them.
    """

    num_server_rounds: int = 3
    fraction_train: float = 1.0
    local_epochs: int = 1
    learning_rate: float = 0.05
    batch_size: int = 32
    dataset: str = "mnist"
    data_dir: str = ""
    dirichlet_alpha: float = 0.5
    seed: int = 42
    attacker_fraction: float = 0.0
    attack: str = "label-flip"
    attack_scale: float = 1.0
    output_dir: str = ""
    strategy: str = "bcsfl"
    selection: str = _ROUND.selection
    num_validators: int = _ROUND.num_validators
    num_miners: int = _ROUND.num_miners
    initial_stake: str = _ROUND.initial_stake
    attacker_stake: float = 1.0
    stake_reward: float = _ROUND.stake_reward
    stake_slash: float = _ROUND.stake_slash
    stake_ceiling: float = _ROUND.stake_ceiling
    stake_left_out: float = _ROUND.stake_left_out
    vote_tolerance: float = _ROUND.vote_tolerance
    outlier_norm_ratio: float = _ROUND.outlier_norm_ratio
    split_margin: float = _ROUND.split_margin
    example_cap_ratio: float = _ROUND.example_cap_ratio
    loss_metric_key: str = _ROUND.loss_metric_key
    committee_timeout: float = _ROUND.committee_timeout
    chain: str = "embedded"
    chain_retry_attempts: int = 5
    chain_retry_base_delay: float = 0.5
    packet_window_s: float = 300.0
    require_signed: bool = True
    replayable_rounds: bool = True
    resume: bool = False
    round_timeout: float = 3600.0
    fault: str = "none"
    fault_partition: int = 0
    fault_round: int = 1
    client_registry: str = ""
    operator_keystore: str = ""
    operator_keystore_password_file: str = ""
    dp: bool = False
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 0.0
    ckks: bool = _ROUND.ckks
    ckks_key_seed: int = 0

    def __post_init__(self) -> None:
        try:
            validate_parameters(self, RUN_CONSTRAINTS)
            self.round_settings()
        except SettingError as err:
            raise ConfigError(f"run config '{_key(err.setting)}' {err.detail}") from err
        _require(
            self.strategy not in BYZFL_BASELINES or importlib.util.find_spec("byzfl") is not None,
            "strategy",
            f"{self.strategy!r} is byzfl's: pip install --no-deps 'byzfl==0.0.11'",
        )
        self._check_chain()
        self._check_extras()

    def _check_chain(self) -> None:
        """Check the settings that only make sense with, or without, an audit chain."""
        _require(
            self.operator_keystore == "" or self.chain != "none",
            "operator-keystore",
            "needs a chain (chain = 'none' anchors nothing)",
        )
        _require(
            not self.resume or (self.strategy == "bcsfl" and self.chain != "none"),
            "resume",
            "needs strategy 'bcsfl' and an audit chain: a run continues from its anchored "
            "model, its chain state and its recorded stakes",
        )
        _require(
            not self.resume or self.output_dir != "",
            "resume",
            "needs output-dir: the directory of the run to continue",
        )
        _require(
            not (self.require_signed and self.chain == "none" and self.strategy == "bcsfl"),
            "require-signed",
            "needs an audit chain to check signatures against (chain is 'none'); set "
            "require-signed=false to admit unsigned clients",
        )
        _require(
            not self._shared_chain() or self.strategy != "bcsfl" or self.client_registry != "",
            "client-registry",
            "is needed on a shared chain (a URL): without it the public development keys "
            "would be registered, and any node could sign as one of them",
        )

    def _check_extras(self) -> None:
        """Check DP's budget and that the extras ``dp`` and ``ckks`` need are installed."""
        _require(
            self.dp or self.dp_target_epsilon == 0,
            "dp-target-epsilon",
            "needs dp=true (a budget means nothing without DP-SGD)",
        )
        for flag, extra in ((self.dp, "dp"), (self.ckks, "ckks")):
            if flag:
                try:
                    require_extra(extra, f"run config '{extra}=true'")
                except MissingExtraError as err:
                    raise ConfigError(str(err)) from err
        _require(
            not self.ckks or self.strategy == "bcsfl",
            "ckks",
            f"needs strategy 'bcsfl' (Flower's {self.strategy!r} cannot add ciphertexts)",
        )

    def _shared_chain(self) -> bool:
        """Whether ``chain`` is a node's URL (a deployment), not a simulation's own chain."""
        return self.chain.startswith(("http://", "https://"))

    def round_settings(self) -> RoundSettings:
        """Return the BCSFL round settings these keys describe (validating them).

        Every :class:`RoundSettings` field is a key of the same name, but for
        ``noisy_updates``, which DP-SGD (``dp``) implies.
        """
        values = {
            setting.name: getattr(self, setting.name)
            for setting in dataclasses.fields(RoundSettings)
            if setting.name != "noisy_updates"
        }
        return RoundSettings(**values, noisy_updates=self.dp)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from Flower's run config, failing fast on bad values.

        Parameters
        ----------
        run_config : Mapping[str, Any]
            ``context.run_config``. Keys absent from it keep their defaults; keys the
            app does not know are ignored so that a user's own keys can live beside
            ours in the same pyproject.

        Raises
        ------
        ConfigError
            If a value has the wrong type or is out of range; the message names the
            kebab-case key.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            key = _key(field.name)
            if key in run_config:
                values[field.name] = _coerce(key, run_config[key], type(field.default))
        return cls(**values)

    def resolved_data_dir(self) -> Path:
        """Return the data directory: ``data-dir``, else ``$BCSFL_DATA_DIR``, else a cache."""
        configured = self.data_dir or os.environ.get(DATA_DIR_ENV, "")
        if configured:
            return Path(configured).expanduser().resolve()
        return Path.home() / ".cache" / "bcsfl-flower" / "data"

    def resolved_output_dir(self) -> Path:
        """Return the output directory: ``output-dir``, else ``$BCSFL_OUTPUT_DIR``, else a new one.

        The fallback is a fresh timestamped directory under ``~/.cache/bcsfl-flower/runs``
        so two runs never overwrite each other's results.
        """
        if self.output_dir:
            return Path(self.output_dir)
        configured = os.environ.get(OUTPUT_DIR_ENV, "")
        if configured:
            path = Path(configured).expanduser()
            if not path.is_absolute():
                raise ConfigError(f"${OUTPUT_DIR_ENV} must be an absolute path, got {configured!r}")
            return path
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path.home() / ".cache" / "bcsfl-flower" / "runs" / stamp


_PATH = AbsolutePathOrEmpty()

RUN_CONSTRAINTS: Mapping[str, Constraint] = {
    **{key: ROUND_CONSTRAINTS[key] for key in ROUND_CONSTRAINTS if key != "noisy_updates"},
    "num_server_rounds": _COUNT,
    "fraction_train": Interval(0.0, 1.0, low_open=True),
    "local_epochs": _COUNT,
    "learning_rate": _POSITIVE,
    "batch_size": _COUNT,
    "dataset": OneOf(lambda: DATASETS),
    "data_dir": Text(),
    "dirichlet_alpha": _POSITIVE,
    "seed": _INDEX,
    "attacker_fraction": Interval(0.0, 1.0, high_open=True),
    "attack": OneOf(lambda: ATTACKS),
    "attack_scale": _POSITIVE,
    "output_dir": _PATH,
    "strategy": OneOf(lambda: STRATEGIES),
    "attacker_stake": _NON_NEGATIVE,
    "chain": ChainName(),
    "chain_retry_attempts": _COUNT,
    "chain_retry_base_delay": _NON_NEGATIVE,
    "packet_window_s": _POSITIVE,
    "require_signed": Boolean(),
    "replayable_rounds": Boolean(),
    "resume": Boolean(),
    "round_timeout": _POSITIVE,
    "fault": OneOf(lambda: FAULTS),
    "fault_partition": _INDEX,
    "fault_round": _COUNT,
    "client_registry": _PATH,
    "operator_keystore": _PATH,
    "operator_keystore_password_file": _PATH,
    "dp": Boolean(),
    "dp_noise_multiplier": _NON_NEGATIVE,
    "dp_max_grad_norm": _POSITIVE,
    "dp_delta": Interval(0.0, 1.0, low_open=True, high_open=True),
    "dp_target_epsilon": _NON_NEGATIVE,
    "ckks_key_seed": _INDEX,
}
"""What each :class:`RunSettings` field accepts; the round's keys reuse
:data:`~bcsfl_flower.round.settings.ROUND_CONSTRAINTS`."""


def _key(setting: str) -> str:
    """Return the run-config key of a setting (``num_validators`` -> ``num-validators``)."""
    return setting.replace("_", "-")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"run config '{key}' {message}")


def _coerce(key: str, value: Any, expected: type) -> Any:
    """Convert a TOML/CLI value to ``expected``, rejecting lossy conversions."""
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run config '{key}' must be true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"run config '{key}' must be an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run config '{key}' must be a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"run config '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {expected!r} for '{key}'")
