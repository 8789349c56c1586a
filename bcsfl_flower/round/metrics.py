"""The metrics a round reports to Flower: the clients' aggregated metrics and BCSFL's own.

Client metrics go through the strategy's ``train_metrics_aggr_fn`` (or
``evaluate_metrics_aggr_fn``), as in ``FedAvg``, but only after two safeguards, because
Flower's default aggregation trusts every reply:

* only records that share the most common shape (the same keys, the same list lengths)
  are aggregated; one client sending other keys or a list of another length would
  otherwise make Flower's aggregation raise and stop the ServerApp;
* each record's weight is the example count credited by the bounds (capped), so a
  client claiming 1e300 examples does not become the whole average.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.common.logger import log

from bcsfl_flower.round.bounds import weighted_median
from bcsfl_flower.round.checks import example_weight, metric_fault
from bcsfl_flower.round.state import RoundRecord

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]
"""Flower's ``(records, weighted_by_key) -> MetricRecord`` aggregation functions."""


METRIC_WEIGHT_CAP_RATIO = 2.0
"""Evaluation replies' example counts are capped at this multiple of their median.

Reported metrics keep FedAvg's example weighting (what a Flower user compares with) up
to twice the median count, so one client claiming 1e300 examples cannot dictate the
federation's loss or accuracy. Training weights are capped harder, at the median (see
:data:`~bcsfl_flower.round.bounds.EXAMPLE_CAP_RATIO`): there the cap is a defence, here
it only bounds a report."""


def _shape(metrics: MetricRecord) -> tuple[tuple[str, int], ...]:
    return tuple(
        sorted(
            (key, len(value) if isinstance(value, list) else -1) for key, value in metrics.items()
        )
    )


def aggregate_client_metrics(
    contents: Sequence[RecordDict],
    credited: Sequence[float],
    weighted_by_key: str,
    aggregate: MetricsAggregation,
) -> MetricRecord | None:
    """Aggregate the metrics of ``contents`` with the example counts ``credited`` to them.

    Records that do not share the most common shape are left out (and logged). Returns
    None when nothing is left.
    """
    records = [next(iter(c.metric_records.values())) for c in contents]
    if not records:
        return None
    common, _ = Counter(_shape(r) for r in records).most_common(1)[0]
    kept = []
    for metrics, weight in zip(records, credited, strict=True):
        if _shape(metrics) != common:
            log(WARNING, "metrics: leaving out a record with other keys or list lengths")
            continue
        values = dict(metrics)
        values[weighted_by_key] = float(weight)
        kept.append(RecordDict({"metrics": MetricRecord(values)}))
    return aggregate(kept, weighted_by_key) if kept else None


def aggregate_evaluate_metrics(
    contents: Sequence[RecordDict], weighted_by_key: str, aggregate: MetricsAggregation
) -> MetricRecord | None:
    """Aggregate federated-evaluation replies, skipping any reply that cannot be weighed."""
    usable, counts = [], []
    for content in contents:
        if len(content.metric_records) != 1:
            continue
        metrics = next(iter(content.metric_records.values()))
        weight = example_weight(metrics, weighted_by_key)
        if isinstance(weight, str) or metric_fault(metrics) is not None:
            log(WARNING, "aggregate_evaluate: leaving out a reply: %s", weight)
            continue
        usable.append(content)
        counts.append(weight)
    if not usable:
        return None
    cap = METRIC_WEIGHT_CAP_RATIO * weighted_median(np.asarray(counts), np.ones(len(counts)))
    return aggregate_client_metrics(
        usable, [min(c, cap) for c in counts], weighted_by_key, aggregate
    )


def round_metrics(record: RoundRecord) -> MetricRecord:
    """Return the clients' aggregated metrics and whether the round committed.

    One outcome key per round: Flower prints every round's train metrics in the run's
    summary, and the decision's detail (who was trusted or rejected, the votes, the
    quorum) is in the log, the round record and the audit trail.
    """
    metrics = MetricRecord(dict(record.client_metrics or {}))
    metrics["bcsfl-committed"] = int(record.committed)
    if record.max_dp_epsilon is not None:
        metrics["bcsfl-max-dp-epsilon"] = record.max_dp_epsilon
    return metrics
