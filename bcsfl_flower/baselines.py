"""Flower's own robust-aggregation strategies, configured for comparison with BCSFL.

The experiments compare BCSFL against the baselines a Flower user would reach for
first. They are Flower's implementations, unchanged; this module only maps the run
config onto their arguments so that every strategy sees the same federation.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from bcsfl_flower.protocol import DP_EPSILON_KEY

BASELINES = ("fedavg", "krum", "multikrum", "fedmedian", "fedtrimmedavg")


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Return Flower's weighted averages, except ``dp-epsilon``: the largest a client spent.

    A federation's privacy guarantee is its weakest client's; an average of epsilons
    would understate it. Only the metrics change: the strategies' models do not.
    """
    metrics = aggregate_metricrecords(records, weighted_by_key)
    spent = [
        float(record[DP_EPSILON_KEY])  # type: ignore[arg-type]
        for content in records
        for record in content.metric_records.values()
        if DP_EPSILON_KEY in record
    ]
    if spent:
        metrics[DP_EPSILON_KEY] = max(spent)
    return metrics


def build_baseline(
    name: str, *, num_nodes: int, attacker_fraction: float, fraction_train: float = 1.0
) -> Strategy:
    """Return Flower's strategy ``name`` with federated evaluation off.

    Krum and MultiKrum need the number of malicious nodes ``f``; they get the expected
    number, ``round(attacker_fraction * num_nodes)``, as an operator who knows the
    threat model would set it (which favours them). MultiKrum keeps ``n - f`` updates.
    FedTrimmedAvg trims ``beta = max(0.1, attacker_fraction)`` from each end, capped
    below 0.5.
    """
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 0.0,
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    malicious = round(attacker_fraction * num_nodes)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "krum":
        return Krum(num_malicious_nodes=malicious, **common)
    if name == "multikrum":
        return MultiKrum(
            num_malicious_nodes=malicious,
            num_nodes_to_select=max(1, num_nodes - malicious),
            **common,
        )
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=min(max(0.1, attacker_fraction), 0.45), **common)
    raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
