"""Screening of client updates by cosine similarity, and loss-delta votes.

BCS-FL trusts the clients whose updates point the same way as the majority. With
``d_k = w_k - w_t`` the update of client ``k`` relative to the global model ``w_t``,
the server computes every pairwise cosine similarity from one Gram matrix, links two
clients when their similarity is at least ``tau``, and trusts the largest cluster of
that graph; the rest is rejected with a reason. A label-flipping or sign-flipping
attacker pushes the model in a direction opposed to the honest majority, so its
similarity to honest clients is low or negative and it lands outside the trusted
cluster.

Validators then score candidate models by the loss delta ``dE = loss(w_t) -
loss(candidate)`` on their own data; :func:`best_candidate_vote` and
:func:`accept_vote` turn those deltas into votes for :mod:`bcsfl_flower.consensus`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024


def flatten_updates(
    client_arrays: Sequence[Sequence[np.ndarray]],
    global_arrays: Sequence[np.ndarray],
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Stack the clients' updates ``w_k - w_t`` into one ``(k, d)`` matrix.

    The matrix is allocated once and filled in place, one array at a time, so the peak
    memory is the matrix itself (``k * d * 4`` bytes in float32: 2 GB for 500 clients
    and a million parameters) and not a second copy from ``np.concatenate``.

    Parameters
    ----------
    client_arrays : Sequence[Sequence[np.ndarray]]
        For each client, its model arrays in the same order and shapes as
        ``global_arrays``.
    global_arrays : Sequence[np.ndarray]
        The global model ``w_t`` the clients started from.
    dtype : numpy dtype (default: float32)
        Floating dtype of the result. float32 halves the memory; the Gram matrix in
        :func:`cosine_similarity_matrix` accumulates in float64 either way.

    Returns
    -------
    np.ndarray
        Array of shape ``(len(client_arrays), total number of parameters)``.
    """
    out_dtype = np.dtype(dtype)
    if out_dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {out_dtype}")
    shapes = [np.shape(a) for a in global_arrays]
    sizes = [math.prod(s) for s in shapes]
    updates = np.empty((len(client_arrays), sum(sizes)), dtype=out_dtype)
    for row, arrays in enumerate(client_arrays):
        if len(arrays) != len(global_arrays):
            raise ValueError(
                f"client {row} sent {len(arrays)} arrays, the global model has {len(global_arrays)}"
            )
        start = 0
        for index, (local, reference, shape, size) in enumerate(
            zip(arrays, global_arrays, shapes, sizes, strict=True)
        ):
            if np.shape(local) != shape:
                raise ValueError(
                    f"client {row}, array {index}: shape {np.shape(local)} does not match "
                    f"the global model's {shape}"
                )
            np.subtract(
                np.ravel(local), np.ravel(reference), out=updates[row, start : start + size]
            )
            start += size
    return updates


CENTERINGS = ("median", "none")
MIN_CENTERED_UPDATES = 5
"""Fewest updates for which ``"median"`` centring is applied (see :func:`center_updates`)."""


def center_updates(updates: np.ndarray, centering: str) -> np.ndarray:
    """Subtract a robust common component from the updates before comparing them.

    ``"none"`` returns ``updates`` unchanged (the paper's raw cosine). ``"median"``
    subtracts the coordinate-wise median update and returns a new array, provided
    there are at least :data:`MIN_CENTERED_UPDATES` updates: with two, the residuals
    are exact opposites, and with three or four the median is mostly made of the
    clients' own coordinates, so the residuals say nothing about a majority. Fewer
    updates are returned unchanged.

    Why: on non-IID data, honest updates after a local epoch are nearly orthogonal in
    raw form (measured on the MNIST CNN: raw cosines of 0.0-0.3 between honest
    clients), so a threshold like the paper's 0.7 links almost nobody and the
    "largest cluster" is an accident. What label flippers share is a common
    *deviation* from the federation's consensus; the coordinate-wise median is that
    consensus as long as fewer than half the clients attack, so after subtracting it
    the attackers' residuals are positively correlated with each other while honest
    residuals scatter around zero. ``sim/screening_calibration.py`` measures both
    choices.
    """
    if centering not in CENTERINGS:
        raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
    if centering == "none" or len(updates) < MIN_CENTERED_UPDATES:
        return updates
    return updates - np.median(updates, axis=0, keepdims=True)


def cosine_similarity_matrix(
    updates: np.ndarray, *, block_bytes: int = _DEFAULT_BLOCK_BYTES, return_norms: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Return all pairwise cosine similarities of the rows of ``updates``.

    One Gram matrix ``G = U U^T`` gives every dot product at once; dividing by the
    outer product of the row norms ``sqrt(diag(G))`` gives the cosines. That is one
    pass over the ``k x d`` data instead of ``k^2 / 2`` separate dot products.

    The Gram matrix is accumulated in float64 over blocks of columns, so float32
    updates do not lose precision over a million parameters, and no float64 copy of the
    whole matrix is ever made (each block is at most ``block_bytes``).

    A zero update (a client that sent back the global model unchanged) has no
    direction. It gets similarity 0 with every other client and 1 with itself, so it
    never links to anyone in the ``tau``-graph (for ``tau > 0``) and the result never
    holds NaN. The result is symmetric, finite and clipped to ``[-1, 1]``.

    Parameters
    ----------
    updates : np.ndarray
        Floating array of shape ``(k, d)``: one flattened update per row.
    block_bytes : int (default: 64 MiB)
        Memory budget for one float64 block of columns.
    return_norms : bool (default: False)
        Also return the updates' Euclidean norms, read off the Gram matrix's diagonal
        at no extra cost (for the norm check of :func:`screen_updates`).

    Returns
    -------
    np.ndarray | tuple[np.ndarray, np.ndarray]
        float64 array of shape ``(k, k)``; with ``return_norms``, also the float64
        norms of shape ``(k,)``.

    Raises
    ------
    ValueError
        If ``updates`` is not 2-D, or holds non-finite values (or values so large that
        their squares overflow float64).
    """
    matrix = np.asarray(updates)
    if matrix.ndim != 2:
        raise ValueError(f"updates must be a 2-D (clients, parameters) array, got {matrix.shape}")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ValueError(f"updates must be a real numeric array, got dtype {matrix.dtype}")
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
    num_clients, num_params = matrix.shape
    gram = np.zeros((num_clients, num_clients), dtype=np.float64)
    if matrix.dtype == np.float64:
        gram = matrix @ matrix.T
    else:
        columns = max(1, block_bytes // (8 * max(num_clients, 1)))
        for start in range(0, num_params, columns):
            block = matrix[:, start : start + columns].astype(np.float64)
            gram += block @ block.T
    if not np.all(np.isfinite(gram)):
        raise ValueError(
            "updates contain non-finite values (or magnitudes whose squares overflow float64)"
        )
    gram = 0.5 * (gram + gram.T)  # BLAS may differ in the last bit between G_ij and G_ji
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    denominator = np.outer(norms, norms)
    similarity = np.zeros_like(gram)
    np.divide(gram, denominator, out=similarity, where=denominator > 0)
    np.clip(similarity, -1.0, 1.0, out=similarity)
    np.fill_diagonal(similarity, 1.0)
    if return_norms:
        return similarity, norms
    return similarity


@dataclass(frozen=True)
class ScreeningResult:
    """Outcome of screening one round's updates.

    Attributes
    ----------
    trusted : tuple[int, ...]
        Row indices of the trusted clients, ascending.
    rejected : tuple[int, ...]
        Row indices of the rejected clients, ascending.
    reasons : tuple[str, ...]
        One human-readable reason per client, in row order, for the results record.
    labels : tuple[int, ...]
        Connected component of each client in the ``tau``-graph, numbered 0, 1, ... in
        order of each component's lowest row index; -1 for clients rejected by the norm
        check before clustering.
    trusted_label : int
        Label of the component the trusted clients come from (-1 if there are no
        clients).
    mean_similarity : tuple[float, ...]
        Each client's cosine similarity to the mean direction of its own cluster (the
        quantity the chain guard checks), in row order: for a client the guard removed,
        the value at the moment of removal; for everyone else, the value for the final
        cluster (0 for clients rejected by the norm check).
    tau_used : float
        The threshold the graph was built with: ``tau``, or lower when
        ``majority_fallback`` had to lower it (NaN if there are no clients).
    """

    trusted: tuple[int, ...]
    rejected: tuple[int, ...]
    reasons: tuple[str, ...]
    labels: tuple[int, ...]
    trusted_label: int
    mean_similarity: tuple[float, ...]
    tau_used: float


def _components(adjacency: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph (breadth-first search)."""
    num_nodes = adjacency.shape[0]
    labels = np.full(num_nodes, -1, dtype=np.int64)
    next_label = 0
    for root in range(num_nodes):
        if labels[root] >= 0:
            continue
        labels[root] = next_label
        frontier = np.array([root])
        while frontier.size:
            reached = np.any(adjacency[frontier], axis=0) & (labels < 0)
            labels[reached] = next_label
            frontier = np.flatnonzero(reached)
        next_label += 1
    return labels


def _refine_by_mean_direction(
    block: np.ndarray, threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Drop, worst first, members whose cosine to the cluster's mean is below ``threshold``.

    The mean is recomputed after every removal, because an outlier drags the mean
    towards itself and can hide a second outlier. The row sums and the squared norm of
    the mean are updated in O(m) per removal instead of being recomputed.

    Returns a keep-mask over the block and each member's cosine to the mean direction:
    of the final cluster for kept members, at the moment of removal for removed ones.
    With ``threshold=None`` nothing is removed.
    """
    keep = np.ones(block.shape[0], dtype=bool)
    row_sums = block.sum(axis=1)
    total = float(row_sums.sum())
    cosines = _cosines_to_mean(row_sums, total)
    while threshold is not None and np.count_nonzero(keep) > 1:
        candidates = np.where(keep, cosines, np.inf)
        worst = int(np.argmin(candidates))
        if candidates[worst] >= threshold:
            break
        keep[worst] = False
        # |m - u_w|^2 = |m|^2 - 2 <u_w, m> + |u_w|^2, with <u_w, m> = row_sums[w].
        total -= 2.0 * row_sums[worst] - block[worst, worst]
        row_sums -= block[:, worst]
        cosines = np.where(keep, _cosines_to_mean(row_sums, total), cosines)
    return keep, cosines


def _cosines_to_mean(row_sums: np.ndarray, total: float) -> np.ndarray:
    """Return ``cos(u_i, m)`` given ``<u_i, m>`` (row sums) and ``|m|^2`` (total).

    The mean direction of unit updates ``u_j`` in a cluster is ``m = sum_j u_j``; its
    cosine with member ``i`` follows from the similarity matrix alone,
    ``cos(u_i, m) = sum_j S_ij / sqrt(sum_{j,l} S_jl)``, so no second pass over the
    updates is needed. If the members cancel out (``m = 0``) every cosine is 0.
    """
    if total <= 1e-12:
        return np.zeros_like(row_sums)
    return np.clip(row_sums / math.sqrt(total), -1.0, 1.0)


def _majority_threshold(similarity: np.ndarray, need: int) -> float:
    """Return the highest ``t`` at which the ``t``-graph has a component of ``need`` nodes.

    This is the level at which single-linkage clustering first forms a cluster of
    ``need`` members. Lowering ``t`` only adds edges, so "a component of ``need`` nodes
    exists" is monotone in ``t`` and a binary search over the distinct off-diagonal
    similarities finds it with O(log k) component labellings.
    """
    size = similarity.shape[0]
    if need <= 1 or size < 2:
        return 1.0
    levels = np.unique(similarity[np.triu_indices(size, 1)])  # ascending
    low, high = 0, levels.size - 1  # the lowest level links everyone: always feasible

    def has_cluster(level: float) -> bool:
        adjacency = similarity >= level
        np.fill_diagonal(adjacency, False)
        return int(np.bincount(_components(adjacency)).max()) >= need

    while low < high:  # find the largest feasible index
        middle = (low + high + 1) // 2
        if has_cluster(float(levels[middle])):
            low = middle
        else:
            high = middle - 1
    return float(levels[low])


def screen_updates(
    similarity: np.ndarray,
    tau: float,
    stakes: Sequence[float] | np.ndarray | None = None,
    *,
    min_mean_similarity: float | None = 0.0,
    majority_fallback: bool = False,
    norms: Sequence[float] | np.ndarray | None = None,
    max_norm_ratio: float | None = None,
) -> ScreeningResult:
    """Split clients into a trusted cluster and rejected outliers.

    Steps:

    1. Norm check (only with ``max_norm_ratio``): an update longer than
       ``max_norm_ratio`` times the median update norm is rejected before clustering.
       Cosine similarity ignores length, so it cannot see an attacker whose update is
       many times larger than everyone else's; the median is unaffected by a minority
       of such updates. Skipped when the median norm is 0.
    2. Build the ``tau``-graph over the remaining clients: an edge between ``i != j``
       when ``similarity[i, j] >= tau``. Its connected components are the clusters, as
       in the paper.
    3. Majority fallback (only with ``majority_fallback``): the paper assumes the
       trusted cluster is a majority. When no cluster at ``tau`` holds a majority of all
       clients (``k // 2 + 1``, or every remaining client if fewer remain), ``tau`` is
       lowered to the highest value at which one does. With non-IID data honest updates
       can be nearly orthogonal while colluding attackers agree with each other, and
       then the largest cluster at a fixed ``tau`` is the attackers'. ``tau`` is never
       raised, so where the paper's ``tau`` already yields a majority nothing changes.
    4. Chain guard (skipped when ``min_mean_similarity`` is None). Connected components
       are transitive: an attacker that is similar enough to one honest client, or a
       chain of attackers each similar to the next, joins the honest cluster while
       pointing away from it. So within each cluster, members whose cosine to the
       cluster's mean direction is below ``min_mean_similarity`` are removed, worst
       first, recomputing the mean each time. The default, 0, removes only members that
       point against the cluster's consensus direction; heterogeneous honest clients,
       whose updates still share the majority's direction, keep a positive cosine to
       the mean and stay. A stricter value (e.g. ``tau``) also removes weakly linked
       members.
    5. The largest refined cluster is trusted. Ties in size go to the larger total
       stake, then to the cluster holding the lowest row index, so the result is
       deterministic. Everyone else is rejected.

    A single client is trusted (there is no majority to compare it with).

    Parameters
    ----------
    similarity : np.ndarray
        ``(k, k)`` cosine similarities, e.g. from :func:`cosine_similarity_matrix`.
    tau : float
        Similarity threshold in ``[-1, 1]``; the paper uses 0.7 on MNIST and 0.5 on
        CIFAR-10.
    stakes : Sequence[float] | np.ndarray | None (default: None)
        Stake of each client, for tie-breaking; None means equal stakes.
    min_mean_similarity : float | None (default: 0.0)
        Minimum cosine to the cluster's mean direction (step 4), or None for the
        paper's plain connected components.
    majority_fallback : bool (default: False)
        Lower ``tau`` until a majority clusters (step 3).
    norms : Sequence[float] | np.ndarray | None (default: None)
        Update norms, e.g. from ``cosine_similarity_matrix(..., return_norms=True)``;
        required with ``max_norm_ratio``.
    max_norm_ratio : float | None (default: None)
        Reject updates longer than this multiple of the median norm (step 1), > 0.

    Returns
    -------
    ScreeningResult
        Trusted and rejected indices with a reason for every client.
    """
    matrix = np.asarray(similarity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"similarity must be a square (k, k) matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("similarity contains non-finite values")
    if not math.isfinite(tau) or not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [-1, 1], got {tau}")
    if min_mean_similarity is not None and (
        not math.isfinite(min_mean_similarity) or not -1.0 <= min_mean_similarity <= 1.0
    ):
        raise ValueError(
            f"min_mean_similarity must be in [-1, 1] or None, got {min_mean_similarity}"
        )
    num_clients = matrix.shape[0]
    weights = _per_client("stakes", stakes, num_clients, default=1.0)
    lengths = _per_client("norms", norms, num_clients, default=0.0)
    if max_norm_ratio is not None:
        if not math.isfinite(max_norm_ratio) or max_norm_ratio <= 0:
            raise ValueError(f"max_norm_ratio must be finite and > 0, got {max_norm_ratio}")
        if norms is None:
            raise ValueError("max_norm_ratio needs the update norms (pass norms=...)")
    if num_clients == 0:
        return ScreeningResult((), (), (), (), -1, (), math.nan)

    # Step 1: norm check.
    median_norm = float(np.median(lengths))
    too_long = np.zeros(num_clients, dtype=bool)
    if max_norm_ratio is not None and median_norm > 0:
        too_long = lengths > max_norm_ratio * median_norm
    candidates = np.flatnonzero(~too_long)
    sub = matrix[np.ix_(candidates, candidates)]

    # Steps 2 and 3: the tau-graph, with tau lowered if no majority clusters.
    tau_used = float(tau)
    if majority_fallback:
        need = min(num_clients // 2 + 1, candidates.size)
        tau_used = min(tau_used, _majority_threshold(sub, need))
    adjacency = sub >= tau_used
    np.fill_diagonal(adjacency, False)
    sub_labels = _components(adjacency)
    num_labels = int(sub_labels.max()) + 1

    # Step 4: chain guard inside every cluster.
    kept: list[np.ndarray] = []
    mean_similarity = np.zeros(num_clients)
    for label in range(num_labels):
        members = np.flatnonzero(sub_labels == label)
        keep, cosines = _refine_by_mean_direction(
            sub[np.ix_(members, members)], min_mean_similarity
        )
        mean_similarity[candidates[members]] = cosines
        kept.append(candidates[members[keep]])

    # Step 5: largest, then most stake, then lowest index (kept[lab] is ascending).
    best = min(
        range(num_labels),
        key=lambda lab: (-kept[lab].size, -math.fsum(weights[kept[lab]]), int(kept[lab][0])),
    )
    trusted_mask = np.zeros(num_clients, dtype=bool)
    trusted_mask[kept[best]] = True
    trusted = np.flatnonzero(trusted_mask)
    labels = np.full(num_clients, -1, dtype=np.int64)
    labels[candidates] = sub_labels

    threshold = f"tau={tau_used:.2f}"
    if tau_used < tau:
        threshold += f" (lowered from {tau:.2f} so that a majority clusters)"
    reasons: list[str] = []
    for i in range(num_clients):
        if trusted_mask[i]:
            reasons.append(
                f"trusted: in the largest cluster at {threshold} "
                f"({trusted.size} of {num_clients} clients)"
            )
        elif too_long[i]:
            reasons.append(
                f"update norm {lengths[i] / median_norm:.2f}x the median, "
                f"above max_norm_ratio={max_norm_ratio:.2f}"
            )
        elif labels[i] == best:
            reasons.append(
                f"cosine similarity to the trusted cluster's mean direction "
                f"{mean_similarity[i]:.2f} below {min_mean_similarity:.2f} "
                f"(linked into the cluster at {threshold} only through a chain)"
            )
        else:
            closest = float(matrix[i, trusted].max())
            reasons.append(
                f"cosine similarity to trusted cluster below {threshold} (max {closest:.2f})"
            )
    return ScreeningResult(
        trusted=tuple(int(i) for i in trusted),
        rejected=tuple(int(i) for i in np.flatnonzero(~trusted_mask)),
        reasons=tuple(reasons),
        labels=tuple(int(label) for label in labels),
        trusted_label=int(best),
        mean_similarity=tuple(float(x) for x in mean_similarity),
        tau_used=tau_used,
    )


def _per_client(
    name: str, values: Sequence[float] | np.ndarray | None, num_clients: int, default: float
) -> np.ndarray:
    """Return one finite, non-negative float per client (``default`` when None)."""
    if values is None:
        return np.full(num_clients, default)
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (num_clients,):
        raise ValueError(f"{name} must have {num_clients} entries, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {array.tolist()}")
    return array


def loss_deltas(baseline_loss: float, candidate_losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """Return ``dE = baseline_loss - candidate_losses`` for one validator.

    A positive ``dE`` means the candidate lowers the validator's loss relative to the
    current global model ``w_t``. Both losses come from the same validator and the same
    data, so the delta cancels out how hard that validator's data is.

    Non-finite losses are kept, not rejected: a NaN delta (e.g. a diverged evaluation)
    can never win :func:`best_candidate_vote` nor pass :func:`accept_vote`, so one
    broken validator reply turns into an abstention instead of an exception.
    """
    losses = np.asarray(candidate_losses, dtype=np.float64)
    if losses.ndim != 1:
        raise ValueError(f"candidate_losses must be 1-D, got shape {losses.shape}")
    if isinstance(baseline_loss, bool) or not isinstance(
        baseline_loss, int | float | np.integer | np.floating
    ):
        raise TypeError(f"baseline_loss must be a real number, got {baseline_loss!r}")
    with np.errstate(invalid="ignore"):
        return float(baseline_loss) - losses


def best_candidate_vote(
    candidate_ids: Sequence[str],
    deltas: Sequence[float] | np.ndarray,
    *,
    min_delta: float = -math.inf,
) -> str | None:
    """Return the candidate a validator votes for in the paper's selection mode.

    The validator votes for the candidate with the largest loss delta ``dE``. Exact
    ties go to the candidate listed first, so validators that see the same numbers cast
    the same vote. Deltas that are NaN or ``-inf`` are never voted for.

    Parameters
    ----------
    candidate_ids : Sequence[str]
        Candidate ids, in the same order for every validator.
    deltas : Sequence[float] | np.ndarray
        This validator's ``dE`` for each candidate.
    min_delta : float (default: -inf)
        Abstain (return None) when even the best ``dE`` is below this. The paper
        always votes (the default); ``0`` votes only for an improvement.

    Returns
    -------
    str | None
        The chosen candidate id, or None to abstain.
    """
    values = np.asarray(deltas, dtype=np.float64)
    if values.shape != (len(candidate_ids),):
        raise ValueError(
            f"deltas must have one entry per candidate: got shape {values.shape} "
            f"for {len(candidate_ids)} candidates"
        )
    if len(set(candidate_ids)) != len(candidate_ids):
        raise ValueError(f"candidate_ids contain duplicates: {list(candidate_ids)}")
    if math.isnan(min_delta):
        raise ValueError("min_delta must not be NaN")
    usable = ~np.isnan(values) & (values > -np.inf)
    if not np.any(usable):
        return None
    best = int(np.argmax(np.where(usable, values, -np.inf)))
    if values[best] < min_delta:
        return None
    return candidate_ids[best]


def accept_vote(delta: float, tolerance: float) -> bool:
    """Return whether a validator accepts a candidate (trusted-mean selection mode).

    The validator accepts when the candidate does not make its loss worse by more than
    ``tolerance``: ``dE >= -tolerance``. The tolerance absorbs evaluation noise, since
    an honest aggregate may raise the loss slightly on one validator's non-IID data
    while improving it for the federation. A NaN delta is never accepted.
    """
    if isinstance(tolerance, bool) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    value = float(delta)
    return not math.isnan(value) and value >= -tolerance
