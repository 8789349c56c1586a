"""``byzfl``'s robust aggregators as Flower strategies, for comparison with BCSFL.

``byzfl`` (EPFL/INRIA) implements the robust aggregators of the Byzantine-robust
learning literature as functions of the ``(n, d)`` matrix of client vectors. This
module wraps them as a Flower :class:`~flwr.serverapp.strategy.FedAvg` whose
``aggregate_train`` aggregates the clients' updates ``w_k - w_t`` with them, so they
run in the same federations as Flower's own strategies. The aggregators are byzfl's,
unchanged; only the radius of centered clipping is set per round (see
:class:`CenteredClippingStrategy`). ``byzfl`` is imported when a strategy is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

VectorFunction = Callable[[np.ndarray], np.ndarray]


class ByzflStrategy(FedAvg):
    """FedAvg with its weighted mean replaced by a byzfl pre-aggregation and aggregator.

    Parameters
    ----------
    aggregator : Callable[[np.ndarray], np.ndarray]
        byzfl aggregator (``(n, d) -> (d,)``).
    pre_aggregators : sequence of Callable[[np.ndarray], np.ndarray]
        byzfl pre-aggregators applied first, in order (``(n, d) -> (n', d)``); each gets
        a copy, since some (ARC, Clipping) work in place.
    **kwargs
        FedAvg's arguments.
    """

    def __init__(
        self,
        aggregator: VectorFunction,
        pre_aggregators: Iterable[VectorFunction] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.aggregator = aggregator
        self.pre_aggregators = tuple(pre_aggregators)
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``w_t`` (updates are taken against it), then sample as FedAvg does."""
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Return ``w_t`` plus the robust aggregate of the valid replies' updates."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = list(replies)
        valid = [r for r in replies if _matches(r, self._global, self.arrayrecord_key)]
        if len(valid) < len(replies):
            log(WARNING, "%d replies left out (error or other arrays)", len(replies) - len(valid))
        if not valid:
            return None, None
        reference = _flatten(self._global)
        updates = np.stack([_flatten(r.content[self.arrayrecord_key]) for r in valid]) - reference
        vectors = updates
        for pre_aggregator in self.pre_aggregators:
            vectors = np.asarray(pre_aggregator(vectors.copy()), dtype=np.float64)
        step = np.asarray(self.aggregate_updates(vectors), dtype=np.float64)
        # Only the metrics of FedAvg's aggregation: its weighted mean of the arrays is
        # what the byzfl aggregator replaces, so it is not computed.
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        return _unflatten(reference + step, self._global), metrics

    def aggregate_updates(self, vectors: np.ndarray) -> np.ndarray:
        """Return the aggregator's step for the (pre-aggregated) updates."""
        return self.aggregator(vectors)


class CenteredClippingStrategy(ByzflStrategy):
    """byzfl's CenteredClipping with a radius that clips: the round's median update norm.

    CenteredClipping keeps its centre between calls (the previous aggregate step), and
    byzfl's default radius (100) never clips an MNIST update; the median norm clips
    half of the updates around the centre.
    """

    def aggregate_updates(self, vectors: np.ndarray) -> np.ndarray:
        """Set the radius to the median norm, then clip around the kept centre."""
        self.aggregator.tau = float(np.median(np.linalg.norm(vectors, axis=1)))  # type: ignore[attr-defined]
        return self.aggregator(vectors)


def byzfl_strategies(num_malicious: int) -> Mapping[str, Callable[..., ByzflStrategy]]:
    """Return builders of the byzfl baselines for ``num_malicious`` assumed attackers."""
    import byzfl

    f = num_malicious
    return {
        "centered-clipping": lambda **kw: CenteredClippingStrategy(byzfl.CenteredClipping(), **kw),
        "geometric-median": lambda **kw: ByzflStrategy(byzfl.GeometricMedian(), **kw),
        "nnm-trmean": lambda **kw: ByzflStrategy(byzfl.TrMean(f=f), [byzfl.NNM(f=f)], **kw),
        "arc-nnm-trmean": lambda **kw: ByzflStrategy(
            byzfl.TrMean(f=f), [byzfl.ARC(f=f), byzfl.NNM(f=f)], **kw
        ),
    }


BYZFL_BASELINES = ("centered-clipping", "geometric-median", "nnm-trmean", "arc-nnm-trmean")
"""Names of the byzfl baselines (the keys of :func:`byzfl_strategies`)."""


def _matches(reply: Message, reference: ArrayRecord, key: str) -> bool:
    if reply.has_error() or key not in reply.content.array_records:
        return False
    arrays = reply.content[key]
    if list(arrays.keys()) != list(reference.keys()):
        return False
    with np.errstate(all="ignore"):
        return all(
            arrays[k].shape == reference[k].shape and np.all(np.isfinite(arrays[k].numpy()))
            for k in reference
        )


def _flatten(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([np.asarray(a.numpy(), np.float64).ravel() for a in arrays.values()])


def _unflatten(vector: np.ndarray, like: ArrayRecord) -> ArrayRecord:
    out, offset = {}, 0
    for key, array in like.items():
        values = array.numpy()
        chunk = vector[offset : offset + values.size].reshape(values.shape)
        out[key] = Array(chunk.astype(values.dtype))
        offset += values.size
    return ArrayRecord(out)
