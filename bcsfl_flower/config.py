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
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcsfl_flower.baselines import BASELINES
from bcsfl_flower.byzfl_strategy import BYZFL_BASELINES
from bcsfl_flower.extras import MissingExtraError, require_extra
from bcsfl_flower.round.screening import OUTLIER_NORM_RATIO, SPLIT_MARGIN
from bcsfl_flower.round.selection import selection_rule
from bcsfl_flower.round.settings import (
    DEFAULT_REWARD,
    DEFAULT_SLASH_FRACTION,
    RoundSettings,
    SettingError,
    StakePolicy,
    ValidationSettings,
)
from bcsfl_flower.round.stakes import INITIAL_STAKES

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
class RunSettings:
    """Every run-config key of the app, typed and validated.

    Attribute names are the snake_case form of the kebab-case keys in
    ``[tool.flwr.app.config]``; :data:`KEYS` maps one to the other.
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
    selection: str = "trusted-mean"
    num_validators: int = 5
    num_miners: int = 5
    initial_stake: str = "equal"
    attacker_stake: float = 1.0
    stake_reward: float = DEFAULT_REWARD
    stake_slash: float = DEFAULT_SLASH_FRACTION
    vote_tolerance: float = 0.05
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO
    split_margin: float = SPLIT_MARGIN
    loss_metric_key: str = "eval_loss"
    chain: str = "embedded"
    chain_retry_attempts: int = 5
    chain_retry_base_delay: float = 0.5
    packet_window_s: float = 300.0
    require_signed: bool = True
    replayable_rounds: bool = False
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
    ckks: bool = False
    ckks_key_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        _require(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        _require(self.learning_rate > 0.0, "learning-rate", "must be > 0")
        _require(self.batch_size >= 1, "batch-size", "must be >= 1")
        _require(self.dataset in DATASETS, "dataset", f"must be one of {DATASETS}")
        _require(self.dirichlet_alpha > 0.0, "dirichlet-alpha", "must be > 0")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(0.0 <= self.attacker_fraction < 1.0, "attacker-fraction", "must be in [0, 1)")
        _require(self.attack in ATTACKS, "attack", f"must be one of {ATTACKS}")
        _require(self.attack_scale > 0.0, "attack-scale", "must be > 0")
        _require(
            self.output_dir == "" or Path(self.output_dir).is_absolute(),
            "output-dir",
            f"must be an absolute path (the ServerApp runs in the SuperLink's working "
            f"directory), got {self.output_dir!r}",
        )

        _require(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        _require(
            self.strategy not in BYZFL_BASELINES or importlib.util.find_spec("byzfl") is not None,
            "strategy",
            f"{self.strategy!r} is byzfl's: pip install --no-deps 'byzfl==0.0.11'",
        )
        _require(self.attacker_stake >= 0.0, "attacker-stake", "must be >= 0")
        try:
            self.round_settings()
            selection_rule(self.selection, encrypted=self.ckks)
            if self.initial_stake not in INITIAL_STAKES:
                raise SettingError("initial_stake", f"must be one of {sorted(INITIAL_STAKES)}")
        except SettingError as err:
            raise ConfigError(f"run config '{err.setting.replace('_', '-')}' {err.detail}") from err
        _require(
            self.chain in ("embedded", "anvil", "none") or self._shared_chain(),
            "chain",
            f"must be 'embedded', 'anvil', 'none' or an http(s):// URL, got {self.chain!r}",
        )
        _require(
            self.operator_keystore == "" or self.chain != "none",
            "operator-keystore",
            "needs a chain (chain = 'none' anchors nothing)",
        )
        _require(self.chain_retry_attempts >= 1, "chain-retry-attempts", "must be >= 1")
        _require(self.chain_retry_base_delay >= 0, "chain-retry-base-delay", "must be >= 0")
        _require(self.packet_window_s > 0, "packet-window-s", "must be > 0")
        _require(self.round_timeout > 0, "round-timeout", "must be > 0")
        _require(self.fault in FAULTS, "fault", f"must be one of {FAULTS}")
        _require(self.fault_partition >= 0, "fault-partition", "must be >= 0")
        _require(self.fault_round >= 1, "fault-round", "must be >= 1")
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
        _require(self.dp_noise_multiplier >= 0, "dp-noise-multiplier", "must be >= 0")
        _require(self.dp_max_grad_norm > 0, "dp-max-grad-norm", "must be > 0")
        _require(0 < self.dp_delta < 1, "dp-delta", "must be in (0, 1)")
        _require(
            math.isfinite(self.dp_target_epsilon) and self.dp_target_epsilon >= 0,
            "dp-target-epsilon",
            "must be a finite number >= 0 (0: no budget)",
        )
        _require(
            self.dp or self.dp_target_epsilon == 0,
            "dp-target-epsilon",
            "needs dp=true (a budget means nothing without DP-SGD)",
        )
        _require(self.ckks_key_seed >= 0, "ckks-key-seed", "must be >= 0")
        for flag, extra in ((self.dp, "dp"), (self.ckks, "ckks")):
            if flag:
                try:
                    require_extra(extra, f"run config '{extra}=true'")
                except MissingExtraError as err:
                    raise ConfigError(str(err)) from err
        if self.ckks:
            _require(
                self.strategy == "bcsfl",
                "ckks",
                f"needs strategy 'bcsfl' (Flower's {self.strategy!r} cannot add ciphertexts)",
            )
        for key, path in (
            ("client-registry", self.client_registry),
            ("operator-keystore", self.operator_keystore),
            ("operator-keystore-password-file", self.operator_keystore_password_file),
        ):
            _require(
                path == "" or Path(path).is_absolute(),
                key,
                f"must be an absolute path (the ServerApp runs in the SuperLink's working "
                f"directory), got {path!r}",
            )
        _require(
            not self._shared_chain() or self.strategy != "bcsfl" or self.client_registry != "",
            "client-registry",
            "is needed on a shared chain (a URL): without it the public development keys "
            "would be registered, and any node could sign as one of them",
        )

    def _shared_chain(self) -> bool:
        """Whether ``chain`` is a node's URL (a deployment), not a simulation's own chain."""
        return self.chain.startswith(("http://", "https://"))

    def round_settings(self) -> RoundSettings:
        """Return the BCSFL round settings these keys describe (validating them)."""
        return RoundSettings(
            num_validators=self.num_validators,
            num_miners=self.num_miners,
            vote_tolerance=self.vote_tolerance,
            noisy_updates=self.dp,
            outlier_norm_ratio=self.outlier_norm_ratio,
            split_margin=self.split_margin,
            stake_policy=StakePolicy(self.stake_reward, self.stake_slash),
            validation=ValidationSettings(loss_metric_key=self.loss_metric_key),
        )

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
            key = field.name.replace("_", "-")
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
