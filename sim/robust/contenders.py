"""The aggregators the bench compares, as Flower strategies, chosen from :data:`CONTENDERS`.

Each contender builds a Flower :class:`~flwr.serverapp.strategy.Strategy` (driven
through the public Strategy API, as in a real ``flwr run``) and gives the optimal
attacks its aggregate as ``f(vectors) -> vector``: byzfl's own implementation of the
same rule for the Flower and byzfl baselines,
:func:`~bcsfl_vision.flame.flame_aggregate` with fixed-seed noise for FLAME, and
:func:`~bcsfl_flower.round.aggregate.screened_mean` for BCSFL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import byzfl
import numpy as np
from flwr.serverapp.strategy import Strategy

from bcsfl_flower.round.aggregate import screened_mean
from bcsfl_flower.strategy import BCSFL
from bcsfl_vision.baselines import build_baseline
from bcsfl_vision.byzfl_strategy import byzfl_strategies
from bcsfl_vision.flame import flame_aggregate

VectorAggregator = Callable[[np.ndarray], np.ndarray]


def _pipeline(*stages: Callable[[np.ndarray], np.ndarray]) -> VectorAggregator:
    def aggregate(vectors: np.ndarray) -> np.ndarray:
        for stage in stages:
            vectors = np.asarray(stage(np.array(vectors, dtype=np.float64, copy=True)))
        return vectors

    return aggregate


@dataclass(frozen=True)
class Contender:
    """One aggregator of the comparison.

    Attributes
    ----------
    name : str
        Its name in reports.
    build : Callable[[int, int], Strategy]
        ``(num_clients, num_attackers) -> strategy``.
    target : Callable[[int, int], VectorAggregator]
        ``(num_clients, num_attackers) -> f(vectors)``, what the optimal attacks tune against.
    """

    name: str
    build: Callable[[int, int], Strategy]
    target: Callable[[int, int], VectorAggregator]


def _flower(name: str) -> Callable[[int, int], Strategy]:
    return lambda n, f: build_baseline(name, num_nodes=n, attacker_fraction=f / n)


def _byzfl(name: str) -> Callable[[int, int], Strategy]:
    return lambda n, f: byzfl_strategies(f)[name](fraction_evaluate=0.0)


def _trimmed(n: int, f: int) -> VectorAggregator:
    return byzfl.TrMean(f=int(min(max(0.1, f / n), 0.45) * n))


def _flame(n: int, f: int) -> VectorAggregator:
    # Every call draws the same noise (a fresh Generator with a fixed seed), so the
    # optimal attacks' line search sees a deterministic aggregate.
    return lambda vectors: flame_aggregate(vectors, np.random.default_rng(0))


CONTENDERS: Mapping[str, Contender] = {
    c.name: c
    for c in (
        Contender("fedavg", _flower("fedavg"), lambda n, f: byzfl.Average()),
        Contender("multikrum", _flower("multikrum"), lambda n, f: byzfl.MultiKrum(f=f)),
        Contender("fedmedian", _flower("fedmedian"), lambda n, f: byzfl.Median()),
        Contender("fedtrimmedavg", _flower("fedtrimmedavg"), _trimmed),
        Contender(
            "centered-clipping",
            _byzfl("centered-clipping"),
            lambda n, f: byzfl.CenteredClipping(),
        ),
        Contender(
            "geometric-median", _byzfl("geometric-median"), lambda n, f: byzfl.GeometricMedian()
        ),
        Contender(
            "nnm-trmean",
            _byzfl("nnm-trmean"),
            lambda n, f: _pipeline(byzfl.NNM(f=f), byzfl.TrMean(f=f)),
        ),
        Contender(
            "arc-nnm-trmean",
            _byzfl("arc-nnm-trmean"),
            lambda n, f: _pipeline(byzfl.ARC(f=f), byzfl.NNM(f=f), byzfl.TrMean(f=f)),
        ),
        Contender("flame", _flower("flame"), _flame),
        Contender("bcsfl", lambda n, f: BCSFL(fraction_evaluate=0.0), lambda n, f: screened_mean),
    )
}
"""Contenders by name: FedAvg, Flower's robust built-ins, byzfl's baselines, FLAME and BCSFL."""

BASELINES = tuple(name for name in CONTENDERS if name != "bcsfl")
