"""Screening: find the stake-majority cluster of a round's updates from their Gram matrix.

Two tests, both computed from the inner products alone (so CKKS rounds screen exactly
as plaintext rounds do):

1. **Length.** An update longer than :data:`OUTLIER_NORM_RATIO` times the stake-weighted
   median norm is rejected. Label flippers' updates grow to 3-4x the honest length
   once the model has learnt the true labels; scaled, sign-flipped and noise updates
   are longer from the start. Cosine similarity alone cannot see any of this.
2. **Direction.** The remaining updates, scaled to unit length, are centred on their
   mean, which turns a coherent attacking group and the honest majority into two
   opposed directions while unstructured honest differences stay near-orthogonal. Average
   linkage (:func:`scipy.cluster.hierarchy.linkage`) on the cosine distances of the
   centred updates gives a tree; starting from its root, the screen descends into the
   child holding at least :data:`TRUSTED_STAKE_SHARE` of the round's stake for as long
   as the split is significant. The node it stops at is the trusted cluster.

A split is significant when its average-linkage distance exceeds
:func:`split_threshold`: ``1 + 1/(m-1)`` is what ``m`` centred updates with no group
structure average (their residuals sum to zero), and :data:`SPLIT_MARGIN` is the
separation a real group adds. Both constants were chosen with
``sim/screening_calibration.py`` on real MNIST updates (0 of 480 honest updates
rejected at 0% attackers at 20 clients; see docs/round.md).

Why stake decides and not head count: when no side holds a qualified share of the stake
(half the clients attack and hold half the stake) the screen trusts both and reports
the round as *contested*: no rule could tell the sides apart, and the validators, drawn
from both sides, will split along the same line (see
:class:`~bcsfl_flower.round.selection.TrustedMeanSelection`). Once the honest side holds
60% of the stake, it is trusted even as half the clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
from scipy.cluster.hierarchy import ClusterNode, linkage, to_tree
from scipy.spatial.distance import squareform

from bcsfl_flower.round.bounds import bound_updates
from bcsfl_flower.round.state import Bounds, Screening

OUTLIER_NORM_RATIO = 2.5
"""Updates longer than this multiple of the stake-weighted median norm are rejected."""

SPLIT_MARGIN = 0.05
"""How far above the structureless average distance a split must lie to count."""

TRUSTED_STAKE_SHARE = 0.6
"""Smallest share of the round's stake a cluster needs to be trusted over the rest.

A bare majority would let noise-level stake differences decide a near 50/50 split (one
reward more on one side), and the side that wins is then never heard again. Below
this share the screen keeps both sides and the bounds limit the damage."""

AGREEING_COSINE = 0.8
"""Two groups whose mean directions have at least this cosine agree: they are not split.

Centring removes what all updates share, so when every update points the same way the
centred residuals are small and their directions arbitrary; without this guard a
tight, honest federation could be split by chance."""

MIN_CLUSTERED = 4
"""Fewest updates the direction test runs on; fewer have no majority to compare to."""

COORDINATION_MARGIN = 0.2
"""How much tighter than natural neighbours a set-apart group must be to count as coordinated.

A group's tightness is the mean centred cosine between its members; the natural
tightness of the round is the median, over the trusted side, of each client's centred
cosine to its nearest neighbour there. On skewed data honest clients that share a class
form groups about as tight as their nearest neighbours; coordinated attackers are
tighter than anything honest (byzfl's attacks send one vector: tightness 1), and so are
label flippers and a backdoor when the honest data are less skewed. Chosen on the fast
bench's logistic-regression runs (``sim/robust_bench.py``; ``docs/constants.md``)."""


def split_threshold(num_updates: int, margin: float = SPLIT_MARGIN) -> float:
    """Return the average-linkage distance that makes a split of centred updates significant.

    ``m`` mean-centred vectors of equal length with no group structure have average
    pairwise cosine ``-1/(m-1)``, i.e. cosine distance ``1 + 1/(m-1)``; a split is
    trusted as two groups only ``margin`` beyond that.
    """
    if num_updates < 2:
        return float("inf")
    return 1.0 + 1.0 / (num_updates - 1) + margin


def unit_gram(gram: np.ndarray) -> np.ndarray:
    """Return the inner products of the updates scaled to unit length (zero stays zero).

    Screening compares directions only: lengths are judged by the norm test. Centring
    updates of different lengths would make every short honest update look like it
    points against the mean, i.e. towards an attacking group.
    """
    lengths = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    inverse = np.divide(1.0, lengths, out=np.zeros_like(lengths), where=lengths > 0)
    return gram * np.outer(inverse, inverse)


def centred_cosines(gram: np.ndarray) -> np.ndarray:
    """Return the cosine similarities of the updates after subtracting their mean.

    With ``J = I - 11^T/m``, the centred Gram is ``J G J``. A centred update of length
    zero (an update equal to the mean) has cosine 0 with everyone and 1 with itself.
    """
    size = gram.shape[0]
    centre = np.eye(size) - np.full((size, size), 1.0 / size)
    centred = centre @ gram @ centre
    lengths = np.sqrt(np.clip(np.diag(centred), 0.0, None))
    scale = np.outer(lengths, lengths)
    cosines = np.zeros_like(centred)
    np.divide(centred, scale, out=cosines, where=scale > 0)
    np.fill_diagonal(cosines, 1.0)
    return cast(np.ndarray, np.clip(0.5 * (cosines + cosines.T), -1.0, 1.0))


NOISY_SPLIT_MARGIN = 0.3
"""Split margin of the profile geometry (DP updates).

Chosen on the stored updates of the DP frontier's BCSFL runs at noise multiplier 2
(20 clients, 20 rounds each): margins 0.2 to 0.35 rejected no honest update in the clean
run and 108 of 120 label flippers (every flipper from round 3 on) in the 30% run; 0.15
split an honest federation once and 0.4 let 18 more flippers through. 0.3 keeps to the
safe side of that window, since stronger noise adds chance structure."""


class UpdateDirections:
    """What the direction test compares: the updates themselves (plaintext training)."""

    def gram(self, gram: np.ndarray) -> np.ndarray:
        """Return the Gram matrix the direction test clusters."""
        return gram


class ProfileDirections(UpdateDirections):
    """Compare updates by their inner products with the others (DP training).

    DP noise adds each client's noise energy to its own squared norm, which on the DP
    frontier's federation was 97% of it, so unit-length updates are all near-orthogonal
    and no split is ever significant: screening rejected none of the 30% label flippers.
    The inner products between different clients carry no noise bias (independent
    noise averages out), so each client is represented by its row of the Gram matrix
    without the diagonal, ``h_k = (<d_k, d_j>)_j`` with ``h_kk = 0``, and the screen
    clusters those profiles: honest clients share positive inner products with the
    honest majority, flippers negative ones.
    """

    def gram(self, gram: np.ndarray) -> np.ndarray:
        """Return ``H H^T`` for the Gram matrix ``H`` with its diagonal set to zero."""
        hollow = gram - np.diag(np.diag(gram))
        return cast(np.ndarray, hollow @ hollow.T)


def screen_updates(
    gram: np.ndarray,
    bounds: Bounds,
    *,
    outlier_ratio: float = OUTLIER_NORM_RATIO,
    split_margin: float = SPLIT_MARGIN,
    directions: UpdateDirections | None = None,
) -> Screening:
    """Split the round's updates into the trusted cluster and rejected clients.

    Parameters
    ----------
    gram : np.ndarray
        ``(n, n)`` inner products of the raw updates.
    bounds : Bounds
        The round's bounds (norms, clip factors, stakes).
    outlier_ratio : float
        Length test: reject updates longer than this multiple of the norm bound.
    split_margin : float
        Direction test: see :func:`split_threshold`.
    directions : UpdateDirections, optional
        What the direction test compares (default: the updates; after the length test,
        on the updates it kept).

    Returns
    -------
    Screening
        Trusted rows and a reason for every row.
    """
    size = gram.shape[0]
    if size == 0:
        return Screening((), (), float("inf"))
    too_long = (
        bounds.norms > outlier_ratio * bounds.norm_bound
        if bounds.norm_bound > 0
        else (np.zeros(size, dtype=bool))
    )
    rows = np.flatnonzero(~too_long)
    threshold = split_threshold(rows.size, split_margin)
    if rows.size >= MIN_CLUSTERED:
        kept = (directions or UpdateDirections()).gram(gram[np.ix_(rows, rows)])
        units = unit_gram(kept)
        cosines = centred_cosines(units)
        cluster = majority_cluster(cosines, units, bounds.stakes[rows], threshold)
        trusted = rows[cluster.members]
    else:
        cosines, cluster, trusted = None, ClusterDescent(np.arange(rows.size)), rows
    reasons = _reasons(bounds, too_long, rows, trusted, cosines, cluster, threshold, outlier_ratio)
    return Screening(
        tuple(int(i) for i in trusted),
        reasons,
        threshold,
        split=bool(cluster.path),
        contested=cluster.contested,
        set_apart=tuple(
            int(i)
            for i in np.setdiff1d(np.setdiff1d(rows, trusted), rows[list(cluster.coordinated)])
        ),
    )


class ScreeningSettings(Protocol):
    """The settings the bound and screen stages read (a pipeline's or a statement's).

    Read-only members, so that frozen dataclasses (both of them) satisfy it.
    """

    @property
    def example_cap_ratio(self) -> float: ...  # noqa: D102

    @property
    def outlier_norm_ratio(self) -> float: ...  # noqa: D102

    @property
    def split_margin(self) -> float: ...  # noqa: D102

    @property
    def noisy_updates(self) -> bool: ...  # noqa: D102


def bound_and_screen(
    gram: np.ndarray, num_examples: np.ndarray, stakes: np.ndarray, settings: ScreeningSettings
) -> tuple[Bounds, Screening]:
    """Run a round's bound and screen stages on its Gram matrix.

    :func:`~bcsfl_flower.round.planning.plan_round` calls this for the pipeline,
    ``bcsfl audit replay`` and the bench, so a replayed round bounds and screens exactly
    as the round did.
    """
    bounds = bound_updates(
        np.sqrt(np.clip(np.diag(gram), 0.0, None)),
        num_examples,
        stakes,
        example_cap_ratio=settings.example_cap_ratio,
    )
    noisy = settings.noisy_updates
    screening = screen_updates(
        gram,
        bounds,
        outlier_ratio=settings.outlier_norm_ratio,
        split_margin=NOISY_SPLIT_MARGIN if noisy else settings.split_margin,
        directions=ProfileDirections() if noisy else UpdateDirections(),
    )
    return bounds, screening


@dataclass(frozen=True)
class ClusterDescent:
    """Where :func:`majority_cluster` stopped.

    Attributes
    ----------
    members : np.ndarray
        Indices (into the screened rows) of the node reached, ascending.
    path : tuple[float, ...]
        Average-linkage distances of the splits taken on the way down.
    contested : bool
        Whether the descent stopped at a significant split of two disagreeing groups
        because neither holds :data:`TRUSTED_STAKE_SHARE` of the stake.
    coordinated : tuple[int, ...]
        Indices of the split-off groups that are tighter than natural neighbours (see
        :data:`COORDINATION_MARGIN`), ascending: rejected outright. The other split-off
        clients are only set apart.
    """

    members: np.ndarray
    path: tuple[float, ...] = ()
    contested: bool = False
    coordinated: tuple[int, ...] = ()


def majority_cluster(
    cosines: np.ndarray, units: np.ndarray, stakes: np.ndarray, threshold: float
) -> ClusterDescent:
    """Descend the tree into the child holding a qualified share of the stake at each split.

    A split is taken when its average-linkage distance exceeds ``threshold``, the two
    groups' mean directions disagree (cosine below :data:`AGREEING_COSINE`, from the
    uncentred unit inner products ``units``), and the heavier group holds at least
    :data:`TRUSTED_STAKE_SHARE` of the stake. A significant, disagreeing split where
    neither group holds that share ends the descent as *contested*.
    """
    distances = np.clip(1.0 - cosines, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    tree: ClusterNode = to_tree(linkage(squareform(distances, checks=False), method="average"))
    total = float(stakes.sum())
    node, path, contested, coordinated = tree, [], False, []
    while not node.is_leaf() and node.dist > threshold:
        left, right = node.get_left(), node.get_right()
        if _mean_direction_cosine(units, left.pre_order(), right.pre_order()) >= AGREEING_COSINE:
            break
        heavier = max((left, right), key=lambda c: _stake(c, stakes))
        if _stake(heavier, stakes) < TRUSTED_STAKE_SHARE * total:
            contested = True
            break
        lighter = right if heavier is left else left
        if is_coordinated(cosines, lighter.pre_order(), heavier.pre_order()):
            coordinated += lighter.pre_order()
        path.append(float(node.dist))
        node = heavier
    members = np.sort(np.asarray(node.pre_order(), dtype=np.int64))
    return ClusterDescent(members, tuple(path), contested, tuple(sorted(coordinated)))


def is_coordinated(cosines: np.ndarray, group: list[int], rest: list[int]) -> bool:
    """Whether ``group`` is tighter than the clients of ``rest`` are to their nearest neighbours.

    Tightness is the mean centred cosine between the group's members (a single client
    is never a coordinated group); the reference is the median, over ``rest``, of each
    client's largest centred cosine to another client of ``rest``. The group is
    coordinated when it is :data:`COORDINATION_MARGIN` tighter than that.
    """
    if len(group) < 2 or len(rest) < 2:
        return False
    inner = cosines[np.ix_(group, group)]
    tightness = (inner.sum() - np.trace(inner)) / (len(group) * (len(group) - 1))
    neighbours = cosines[np.ix_(rest, rest)].copy()
    np.fill_diagonal(neighbours, -np.inf)
    return bool(tightness > float(np.median(neighbours.max(axis=1))) + COORDINATION_MARGIN)


def _mean_direction_cosine(units: np.ndarray, first: list[int], second: list[int]) -> float:
    """Cosine between the mean unit updates of two groups, from their inner products."""
    cross = float(units[np.ix_(first, second)].sum())
    scale = float(units[np.ix_(first, first)].sum()) * float(units[np.ix_(second, second)].sum())
    return cross / np.sqrt(scale) if scale > 0 else 0.0


def _trusted_detail(cluster: ClusterDescent, size: int, threshold: float) -> str:
    if cluster.contested:
        return (
            f"contested, {size} clients in two groups and neither holds "
            f"{TRUSTED_STAKE_SHARE:.0%} of the stake"
        )
    detail = "no split"
    if cluster.path:
        detail = f"split at distance {cluster.path[-1]:.3f} > {threshold:.3f}"
    return f"in the stake-majority cluster ({size} clients, {detail})"


def _stake(node: ClusterNode, stakes: np.ndarray) -> float:
    return float(stakes[node.pre_order()].sum())


def _reasons(
    bounds: Bounds,
    too_long: np.ndarray,
    rows: np.ndarray,
    trusted: np.ndarray,
    cosines: np.ndarray | None,
    cluster: ClusterDescent,
    threshold: float,
    outlier_ratio: float,
) -> tuple[str, ...]:
    trusted_set = set(int(i) for i in trusted)
    position = {int(row): index for index, row in enumerate(rows)}
    inside = [position[int(i)] for i in trusted]
    coordinated = {int(rows[i]) for i in cluster.coordinated}
    reasons = []
    for row in range(bounds.norms.size):
        if row in trusted_set:
            reasons.append(f"trusted: {_trusted_detail(cluster, len(trusted_set), threshold)}")
        elif too_long[row]:
            reasons.append(
                f"update norm {bounds.norms[row] / bounds.norm_bound:.2f}x the stake-weighted "
                f"median, above {outlier_ratio:.2f}x"
            )
        else:
            mean_cosine = (
                float(np.mean(cosines[position[row], inside])) if cosines is not None else 0
            )
            kind = (
                f"in a coordinated group (tighter than natural neighbours by more than "
                f"{COORDINATION_MARGIN:g})"
                if row in coordinated
                else "set apart (kept only if the validators prefer the federation with it)"
            )
            reasons.append(
                f"outside the stake-majority cluster, {kind}: mean centred cosine "
                f"{mean_cosine:+.2f} to its members, split at distance > {threshold:.3f}"
            )
    return tuple(reasons)
