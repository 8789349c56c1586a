"""The BCSFL strategy: a drop-in replacement for Flower's ``FedAvg``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from bcsfl_flower.replies import AcceptedReply, RejectedReply, ReplyChecker

RoundSink = Callable[[int, dict[str, Any]], None]
"""Receives ``(server_round, record)`` once per round, e.g. :meth:`RunRecorder.record`."""


class BCSFL(FedAvg):
    """Poisoning-resistant federated averaging with per-reply validation.

    Unlike ``FedAvg``, which stops the ServerApp when any reply is inconsistent,
    BCSFL checks every training reply on its own against the global model it sent
    (error replies, missing or extra keys, shapes, dtypes, non-finite values, a
    missing or non-positive example count) and rejects a bad one with a logged
    reason; the round then aggregates the replies that passed.

    Parameters
    ----------
    round_sink : RoundSink, optional
        Called once per round with a JSON-serialisable record of the round (the
        accepted and rejected clients with reasons). The example ServerApp passes
        :meth:`bcsfl_flower.results.RunRecorder.record` to write ``results.json``.
    **fedavg_kwargs
        Every ``FedAvg`` argument (``fraction_train``, ``min_train_nodes``,
        ``weighted_by_key``, ...), with the same meaning.
    """

    def __init__(self, *, round_sink: RoundSink | None = None, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.round_sink = round_sink
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the strategy's configuration."""
        super().summary()
        log(INFO, "\t└──> Replies are validated one by one; bad ones are rejected, not fatal")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model (replies are checked against it), then sample as FedAvg."""
        self._global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies that pass validation, sample-weighted as in FedAvg."""
        if self._global_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train")
        accepted, rejected = ReplyChecker(self._global_arrays, self.weighted_by_key).split(replies)
        log(
            INFO,
            "aggregate_train: %d replies accepted, %d rejected",
            len(accepted),
            len(rejected),
        )
        self._emit(server_round, self._reply_record(accepted, rejected))
        if not accepted:
            log(WARNING, "aggregate_train: no valid reply; keeping the previous global model")
            return None, None
        arrays = aggregate_arrayrecords(
            [RecordDict({"arrays": reply.arrays, "metrics": reply.metrics}) for reply in accepted],
            self.weighted_by_key,
        )
        return arrays, weighted_metrics(accepted, self.weighted_by_key)

    def _reply_record(
        self, accepted: list[AcceptedReply], rejected: list[RejectedReply]
    ) -> dict[str, Any]:
        return {
            "accepted": sorted(reply.node_id for reply in accepted),
            "rejected": {str(reply.node_id): reply.reason for reply in rejected},
        }

    def _emit(self, server_round: int, record: dict[str, Any]) -> None:
        if self.round_sink is not None:
            self.round_sink(server_round, record)


def weighted_metrics(accepted: list[AcceptedReply], weighted_by_key: str) -> MetricRecord:
    """Sample-weighted mean of the scalar metrics that every accepted reply reports.

    Flower's ``aggregate_metricrecords`` assumes identical records and fails on a
    client that sends a list where others send a number; here only finite scalar
    keys common to all replies are averaged, so one odd client cannot break it.
    """
    total = sum(reply.num_examples for reply in accepted)
    common = set.intersection(*(set(reply.metrics.keys()) for reply in accepted))
    common.discard(weighted_by_key)
    merged = MetricRecord()
    for key in sorted(common):
        values = [reply.metrics[key] for reply in accepted]
        if all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            merged[key] = (
                sum(
                    float(v) * reply.num_examples for v, reply in zip(values, accepted, strict=True)
                )
                / total
            )
    return merged
