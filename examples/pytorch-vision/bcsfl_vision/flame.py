"""FLAME (Nguyen et al., USENIX Security 2022) as a baseline robust aggregator.

FLAME defends against backdoors in three steps, each for an attack the others miss:

1. *filtering*: HDBSCAN on the pairwise cosine distances of the client updates keeps
   the majority cluster, so a group of updates pointing away from the honest majority
   is dropped whatever its length;
2. *adaptive clipping*: every admitted update is clipped to the median L2 norm of all
   submitted updates, so an admitted update that is long (a scaled, model-replacement
   update that points in an honest direction) weighs no more than a typical one;
3. *adaptive noise*: Gaussian noise with ``sigma = lambda * median_norm`` is added to
   the average of the clipped updates, to wash out what remains of a backdoor.

:func:`flame_aggregate` is the rule as a pure function of the ``(n, d)`` update matrix
(what ``byzfl``'s optimal attacks tune against), with the noise drawn from a numpy
:class:`~numpy.random.Generator`; :class:`FlameStrategy` runs it in a Flower
federation as a :class:`~bcsfl_vision.byzfl_strategy.ByzflStrategy`, seeding the noise
from its ``seed`` and the server round. scikit-learn (its ``HDBSCAN``) is imported when
updates are first clustered.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from bcsfl_vision.byzfl_strategy import ByzflStrategy

FLAME_NOISE_LAMBDA = 0.001
"""FLAME's noise level ``lambda``: the noise's standard deviation per coordinate is
``lambda`` times the clipping bound (the median update norm). 0.001 is the value that
the FLAME paper (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX
Security 2022) uses for its image-classification tasks, such as the MNIST and CIFAR-10
models this app trains."""

_TINY_NORM = 1e-12
"""Norm below which an update counts as zero (its direction is then undefined)."""


def flame_admitted(updates: np.ndarray) -> np.ndarray:
    """Return the sorted row indices of the updates that FLAME's clustering admits.

    Parameters
    ----------
    updates : np.ndarray
        ``(n, d)`` client updates ``w_k - w_t``.

    Returns
    -------
    np.ndarray
        The indices (int64, ascending) of the largest HDBSCAN cluster, or of every
        update when HDBSCAN puts none in a cluster.

    Notes
    -----
    The distances are cosine distances so that the clustering sees only directions:
    the lengths are FLAME's clipping's business. ``min_cluster_size = n // 2 + 1``
    means that a cluster is a majority of the clients, so an attacker minority can
    never form one of its own; ``min_samples = 1`` makes every update a core point, so
    the honest updates' natural spread does not turn them into noise; and
    ``allow_single_cluster=True`` lets HDBSCAN return the whole honest majority as one
    cluster when there is no attack. Updates labelled noise are dropped. When HDBSCAN
    labels nobody (no majority of similar directions) everybody is kept, as in FLAME's
    code: dropping everyone would stall training.
    """
    updates = np.asarray(updates, dtype=np.float64)
    n = len(updates)
    if n < 3:  # no majority cluster of at least two can leave anyone out
        return np.arange(n)
    from sklearn.cluster import HDBSCAN

    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    unit = updates / np.maximum(norms, _TINY_NORM)
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    labels = HDBSCAN(
        metric="precomputed",
        min_cluster_size=n // 2 + 1,
        min_samples=1,
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(distances)
    clustered = labels >= 0
    if not np.any(clustered):
        return np.arange(n)
    majority = np.bincount(labels[clustered]).argmax()
    return np.flatnonzero(labels == majority)


def flame_aggregate(
    updates: np.ndarray,
    rng: np.random.Generator,
    noise_lambda: float = FLAME_NOISE_LAMBDA,
) -> np.ndarray:
    """Return FLAME's aggregate step for the client updates.

    Parameters
    ----------
    updates : np.ndarray
        ``(n, d)`` client updates ``w_k - w_t`` (their norms are the clients' distances
        to the global model ``w_t``).
    rng : np.random.Generator
        Source of the Gaussian noise; a seeded Generator makes the step reproducible.
    noise_lambda : float
        Noise level: the noise's standard deviation is ``noise_lambda`` times the
        clipping bound. Defaults to :data:`FLAME_NOISE_LAMBDA`; 0 adds no noise.

    Returns
    -------
    np.ndarray
        ``(d,)`` step to add to ``w_t``: the mean of the admitted updates, each clipped
        to the median norm, plus ``N(0, (noise_lambda * median_norm)^2)`` noise in
        every coordinate.

    Notes
    -----
    * Filtering (:func:`flame_admitted`) drops the updates that point away from the
      majority.
    * The clipping bound is the median norm of *all* submitted updates, not only the
      admitted ones: with an honest majority it is an honest update's length whatever
      the attackers send, and clipping every admitted update to it bounds how far one
      admitted update can pull the mean (a long update in an honest direction passes
      the filter, since cosine distances ignore length). Shorter updates are kept as
      they are.
    * The clipped updates are averaged with equal weights (FLAME does not weight by
      example counts, which a client could inflate).
    * The noise is scaled to the clipping bound, so it is as large relative to one
      client's influence in every round: enough to smooth out a backdoor's residue,
      small (lambda = 0.001) next to an honest step.
    """
    updates = np.asarray(updates, dtype=np.float64)
    if updates.ndim != 2 or len(updates) == 0:
        raise ValueError(f"expected a non-empty (n, d) matrix of updates, got {updates.shape}")
    if noise_lambda < 0:
        raise ValueError(f"noise_lambda must be non-negative, got {noise_lambda}")
    norms = np.linalg.norm(updates, axis=1)
    bound = float(np.median(norms))
    admitted = flame_admitted(updates)
    scales = np.minimum(1.0, bound / np.maximum(norms[admitted], _TINY_NORM))
    step = (updates[admitted] * scales[:, None]).mean(axis=0)
    sigma = noise_lambda * bound
    if sigma > 0:
        step = step + rng.normal(0.0, sigma, size=step.shape)
    return step


class FlameStrategy(ByzflStrategy):
    """FLAME as a Flower strategy: FedAvg with its weighted mean replaced by FLAME.

    Parameters
    ----------
    seed : int
        Seed of the noise: round ``t`` draws it from
        ``np.random.default_rng([seed, t])``, so a rerun adds the same noise.
    noise_lambda : float
        FLAME's noise level (:data:`FLAME_NOISE_LAMBDA`).
    **kwargs
        FedAvg's arguments.
    """

    def __init__(
        self, seed: int = 0, noise_lambda: float = FLAME_NOISE_LAMBDA, **kwargs: object
    ) -> None:
        super().__init__(self.aggregate_updates, **kwargs)
        self.seed = seed
        self.noise_lambda = noise_lambda
        self._round: int | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Remember the round (it seeds the noise), then aggregate as ByzflStrategy does."""
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def aggregate_updates(self, vectors: np.ndarray) -> np.ndarray:
        """Return FLAME's step, with noise seeded from ``seed`` and the server round."""
        if self._round is None:
            raise RuntimeError("aggregate_updates called outside aggregate_train")
        rng = np.random.default_rng([self.seed, self._round])
        return flame_aggregate(vectors, rng, self.noise_lambda)
