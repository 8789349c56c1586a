"""The example app's train metrics: what its clients report, and how the server averages them.

A client reports its training loss, its example count, the epsilon it has spent under
DP, and its ``partition-id``. The partition id is an identifier, not a measurement: the
simulation reads it per client to score attacker detection, and an average of ids
(3.37) in the run's summary would read as a result. So the app's strategies aggregate
with :func:`aggregate_train_metrics`, which leaves it out.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from bcsfl_flower.protocol import DP_EPSILON_KEY

PARTITION_ID_METRIC = "partition-id"
"""Train metric with the client's partition (simulation scoring only; never averaged)."""


def aggregate_train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Return Flower's weighted averages, with ``dp-epsilon`` the largest a client spent.

    A federation's privacy guarantee is its weakest client's; an average of epsilons
    would understate it. :data:`PARTITION_ID_METRIC` is left out. Only the metrics
    change: the strategies' models do not.
    """
    measured = [_without_ids(content) for content in records]
    metrics = aggregate_metricrecords(measured, weighted_by_key)
    spent = [
        float(record[DP_EPSILON_KEY])  # type: ignore[arg-type]
        for content in records
        for record in content.metric_records.values()
        if DP_EPSILON_KEY in record
    ]
    if spent:
        metrics[DP_EPSILON_KEY] = max(spent)
    return metrics


def _without_ids(content: RecordDict) -> RecordDict:
    return RecordDict(
        {
            key: MetricRecord({k: v for k, v in record.items() if k != PARTITION_ID_METRIC})
            for key, record in content.metric_records.items()
        }
    )
