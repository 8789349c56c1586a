"""Client-side differential privacy: Opacus DP-SGD for any PyTorch training loop.

:func:`make_private` turns a user's ``(model, optimizer, data_loader)`` into their
DP-SGD counterparts (per-sample gradient clipping to ``max_grad_norm``, Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm``, Poisson sampling of the
batches) and tracks the privacy spent with Opacus' RDP accountant. The training loop
itself does not change: it calls ``zero_grad``/``backward``/``step`` on what it gets
back.

Cumulative epsilon across Flower rounds
    A ClientApp is instantiated anew for every message, so an Opacus
    ``PrivacyEngine`` never lives longer than one round. What makes epsilon cumulative
    is the accountant's *history*, a list of ``(noise_multiplier, sample_rate,
    steps)`` entries: :meth:`PrivateTraining.accountant_state` returns it as three
    parallel plain lists (the shape a Flower ``ConfigRecord`` accepts, so it can be
    kept in ``context.state``), and passing it back as ``accountant_state`` to the
    next round's :func:`make_private` continues the same accounting. The RDP
    accountant composes all entries, so epsilon after round ``t`` covers every DP-SGD
    step the client ever took, even when its sampling rate changes between rounds.

Original parameter names
    Opacus' default is to wrap the model in a ``GradSampleModule``, whose
    ``state_dict`` keys carry a ``_module.`` prefix. Here the model is *not* wrapped
    (Opacus ``wrap_model=False``): per-sample-gradient hooks are attached to the
    user's own module, so ``model.state_dict()`` keeps the original keys and the
    weights sent back to the server match the global model's. Call
    :meth:`PrivateTraining.close` (or use the object as a context manager) to remove
    the hooks once training is done.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from types import TracebackType
from typing import Any

from flwr.common.logger import log

from bcsfl_flower.extras import missing_extra

try:
    import torch
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer
    from opacus.validators import ModuleValidator
    from torch import nn
    from torch.utils.data import DataLoader
except ImportError as err:
    raise missing_extra("dp", "Differential privacy (DP-SGD)") from err

AccountantState = dict[str, list[float] | list[int]]
"""Accountant history as plain lists: ``noise_multipliers``, ``sample_rates``, ``steps``."""

_STATE_KEYS = ("noise_multipliers", "sample_rates", "steps")


@dataclass(frozen=True)
class DPConfig:
    """Parameters of DP-SGD.

    Parameters
    ----------
    noise_multiplier : float
        Ratio of the Gaussian noise's standard deviation to ``max_grad_norm``. Must be
        positive: without noise there is no privacy and epsilon is infinite.
    max_grad_norm : float
        L2 bound each per-sample gradient is clipped to (the sensitivity).
    delta : float (default: 1e-5)
        Target delta of the (epsilon, delta) guarantee; it should be well below
        ``1 / number of training examples``.
    poisson_sampling : bool (default: True)
        Draw each batch by Poisson sampling, as the RDP analysis assumes. Turning it
        off keeps the user's batches and makes the reported epsilon an approximation.
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        _require_positive_finite("noise_multiplier", self.noise_multiplier)
        _require_positive_finite("max_grad_norm", self.max_grad_norm)
        _require_delta(self.delta)
        if not isinstance(self.poisson_sampling, bool):
            raise TypeError(f"poisson_sampling must be a bool, got {self.poisson_sampling!r}")


class PrivateTraining:
    """What a training loop needs for DP-SGD, plus the privacy spent so far.

    Built by :func:`make_private`; use :attr:`model`, :attr:`optimizer` and
    :attr:`data_loader` in place of the originals.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: DPOptimizer,
        data_loader: DataLoader[Any],
        engine: PrivacyEngine,
        hooks: Any,
        config: DPConfig,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.config = config
        self._engine = engine
        self._hooks = hooks

    def epsilon(self, delta: float | None = None) -> float:
        """Return the cumulative epsilon spent at ``delta`` (default: the config's).

        Covers every step recorded in the accountant, including the history restored
        from earlier rounds; 0.0 before the first step.
        """
        delta = self.config.delta if delta is None else delta
        _require_delta(delta)
        return float(self._engine.accountant.get_epsilon(delta=delta))

    def accountant_state(self) -> AccountantState:
        """Return the accountant history as plain lists, to restore it next round."""
        return save_accountant_state(self._engine.accountant)

    def close(self) -> None:
        """Remove the per-sample-gradient hooks from the model (idempotent)."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None

    def __enter__(self) -> PrivateTraining:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def check_opacus_compatible(model: nn.Module) -> None:
    """Raise ValueError naming every layer Opacus cannot compute per-sample gradients for.

    BatchNorm, for example, mixes the samples of a batch, so one sample's gradient is
    not defined on its own. ``opacus.validators.ModuleValidator.fix(model)`` replaces
    such layers (BatchNorm becomes GroupNorm); it changes the architecture, so every
    client and the server must use the fixed model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        details = "; ".join(str(error) for error in errors)
        raise ValueError(
            f"model {type(model).__name__} is not compatible with Opacus DP-SGD: {details}. "
            "Use opacus.validators.ModuleValidator.fix(model) on the model definition that "
            "every client and the server share."
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    config: DPConfig,
    accountant_state: Mapping[str, Sequence[float] | Sequence[int]] | None = None,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Prepare ``model``, ``optimizer`` and ``data_loader`` for DP-SGD.

    Parameters
    ----------
    model : nn.Module
        The user's model. It is not wrapped: hooks are attached to it in place, so
        ``model.state_dict()`` keeps its original keys.
    optimizer : torch.optim.Optimizer
        An optimizer over ``model.parameters()``.
    data_loader : DataLoader
        The client's training data. With Poisson sampling it is replaced by a loader
        of the same dataset whose batches have the same expected size.
    config : DPConfig
        Noise multiplier, clipping norm and delta.
    accountant_state : Mapping, optional
        History saved by :meth:`PrivateTraining.accountant_state` in earlier rounds;
        epsilon then keeps growing from where it stopped.
    noise_generator : torch.Generator, optional
        Source of the Gaussian noise, for reproducible simulations. Leave it unset in
        a deployment: a seeded noise generator is predictable.

    Returns
    -------
    PrivateTraining
        The DP model (the same object as ``model``), optimizer and data loader.

    Raises
    ------
    ValueError
        If the model has layers Opacus cannot handle, or ``accountant_state`` is
        malformed.
    TypeError
        If ``config`` is not a :class:`DPConfig`.
    """
    if not isinstance(config, DPConfig):
        raise TypeError(f"config must be a DPConfig, got {type(config).__name__}")
    check_opacus_compatible(model)
    engine = PrivacyEngine(accountant="rdp")
    if accountant_state is not None:
        load_accountant_state(engine.accountant, accountant_state)
    hooks, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=config.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        poisson_sampling=config.poisson_sampling,
        noise_generator=noise_generator,
        wrap_model=False,
    )
    log(
        INFO,
        "DP-SGD on: noise_multiplier=%s, max_grad_norm=%s, sample_rate=%.4g",
        config.noise_multiplier,
        config.max_grad_norm,
        1 / len(dp_loader),
    )
    return PrivateTraining(model, dp_optimizer, dp_loader, engine, hooks, config)


def save_accountant_state(accountant: RDPAccountant) -> AccountantState:
    """Return an RDP accountant's history as three parallel plain lists.

    Lists of floats and of ints are valid ``ConfigRecord`` values, so the result can go
    straight into ``context.state["dp"] = ConfigRecord(state)``.
    """
    if not isinstance(accountant, RDPAccountant):
        raise TypeError(f"accountant must be an RDPAccountant, got {type(accountant).__name__}")
    history = list(accountant.history)
    return {
        "noise_multipliers": [float(entry[0]) for entry in history],
        "sample_rates": [float(entry[1]) for entry in history],
        "steps": [int(entry[2]) for entry in history],
    }


def load_accountant_state(
    accountant: RDPAccountant, state: Mapping[str, Sequence[float] | Sequence[int]]
) -> None:
    """Restore a history saved by :func:`save_accountant_state` into ``accountant``.

    Raises
    ------
    ValueError
        If keys are missing, the lists differ in length, or an entry is out of range
        (noise multiplier <= 0, sample rate outside (0, 1], steps < 1).
    """
    if not isinstance(accountant, RDPAccountant):
        raise TypeError(f"accountant must be an RDPAccountant, got {type(accountant).__name__}")
    accountant.history = _history_from_state(state)


def epsilon_from_state(state: Mapping[str, Sequence[float] | Sequence[int]], delta: float) -> float:
    """Return the epsilon of a saved history at ``delta``, without any model or data.

    Lets a server (or an auditor) recompute the epsilon a client reports from the
    history it reports.
    """
    return _epsilon_of(_history_from_state(state), delta)


def projected_epsilon(
    state: Mapping[str, Sequence[float] | Sequence[int]] | None,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
) -> float:
    """Return the epsilon after ``steps`` more DP-SGD steps on top of a saved history.

    The same RDP analysis as :meth:`PrivateTraining.epsilon`, run on the history plus
    the planned steps, so a client can tell before training what training will spend.
    """
    _require_positive_finite("noise_multiplier", noise_multiplier)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    history = _history_from_state(state) if state else []
    if steps > 0:
        history.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return _epsilon_of(history, delta)


def _epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Return the RDP accountant's epsilon at ``delta`` for ``history`` (0.0 when empty)."""
    _require_delta(delta)
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


def _history_from_state(
    state: Mapping[str, Sequence[float] | Sequence[int]],
) -> list[tuple[float, float, int]]:
    if not isinstance(state, Mapping):
        raise TypeError(f"accountant state must be a mapping, got {type(state).__name__}")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"accountant state is missing {missing}; expected keys {_STATE_KEYS}")
    noise, rates, steps = (list(state[key]) for key in _STATE_KEYS)
    if not len(noise) == len(rates) == len(steps):
        raise ValueError(
            "accountant state lists differ in length: "
            f"noise_multipliers={len(noise)}, sample_rates={len(rates)}, steps={len(steps)}"
        )
    history: list[tuple[float, float, int]] = []
    for index, (sigma, rate, count) in enumerate(zip(noise, rates, steps, strict=True)):
        if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"accountant state noise_multipliers[{index}]={sigma!r} is not > 0")
        if not (isinstance(rate, numbers.Real) and 0 < rate <= 1):
            raise ValueError(f"accountant state sample_rates[{index}]={rate!r} is not in (0, 1]")
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"accountant state steps[{index}]={count!r} is not an int >= 1")
        history.append((float(sigma), float(rate), int(count)))
    return history


def _require_positive_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def _require_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a number, got {delta!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
