"""The baselines, Flower's own strategies, byzfl's and FLAME, configured for comparison.

The experiments compare BCSFL against the baselines a Flower user would reach for
first, Flower's implementations unchanged, against the robust aggregators of the
``byzfl`` library (EPFL/INRIA) wrapped as Flower strategies, and against FLAME
(:mod:`bcsfl_vision.flame`). This module only maps the run config onto their arguments
so that every strategy sees the same federation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from bcsfl_vision.app_metrics import aggregate_train_metrics
from bcsfl_vision.byzfl_strategy import BYZFL_BASELINES, byzfl_strategies
from bcsfl_vision.flame import FlameStrategy


@dataclass(frozen=True)
class ThreatModel:
    """What a baseline is told about the federation it defends."""

    num_nodes: int
    attacker_fraction: float

    @property
    def malicious(self) -> int:
        """The expected number of attackers, ``round(attacker_fraction * num_nodes)``."""
        return round(self.attacker_fraction * self.num_nodes)


BaselineBuilder = Callable[[ThreatModel, dict[str, Any]], Strategy]
"""``(threat model, FedAvg's common arguments) -> strategy``."""


def _byzfl(name: str) -> BaselineBuilder:
    def build(threat: ThreatModel, common: dict[str, Any]) -> Strategy:
        return byzfl_strategies(threat.malicious)[name](**common)

    return build


BASELINE_BUILDERS: Mapping[str, BaselineBuilder] = {
    "fedavg": lambda threat, common: FedAvg(**common),
    "krum": lambda threat, common: Krum(num_malicious_nodes=threat.malicious, **common),
    "multikrum": lambda threat, common: MultiKrum(
        num_malicious_nodes=threat.malicious,
        num_nodes_to_select=max(1, threat.num_nodes - threat.malicious),
        **common,
    ),
    "fedmedian": lambda threat, common: FedMedian(**common),
    "fedtrimmedavg": lambda threat, common: FedTrimmedAvg(
        beta=min(max(0.1, threat.attacker_fraction), 0.45), **common
    ),
    **{name: _byzfl(name) for name in BYZFL_BASELINES},
    "flame": lambda threat, common: FlameStrategy(**common),
}
"""The baselines by run-config name: Flower's own, then byzfl's (``byzfl`` is imported
only when one of those is built), then FLAME (scikit-learn is imported when it first
aggregates)."""

BASELINES = tuple(BASELINE_BUILDERS)


def build_baseline(
    name: str, *, num_nodes: int, attacker_fraction: float, fraction_train: float = 1.0
) -> Strategy:
    """Return the baseline strategy ``name`` with federated evaluation off.

    Krum, MultiKrum and byzfl's aggregators need the number of malicious nodes ``f``;
    they get the expected number, ``round(attacker_fraction * num_nodes)``, as an
    operator who knows the threat model would set it (which favours them). MultiKrum
    keeps ``n - f`` updates. FedTrimmedAvg trims ``beta = max(0.1, attacker_fraction)``
    from each end, capped below 0.5. byzfl's are wrapped by
    :mod:`bcsfl_vision.byzfl_strategy` (centered clipping at the round's median norm).
    FLAME needs no ``f`` (its cluster is any majority) and seeds its noise with 0 and
    the round.
    """
    if name not in BASELINE_BUILDERS:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 0.0,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    return BASELINE_BUILDERS[name](ThreatModel(num_nodes, attacker_fraction), common)
