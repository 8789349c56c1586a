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


def cosine_similarity_matrix(
    updates: np.ndarray, *, block_bytes: int = _DEFAULT_BLOCK_BYTES
) -> np.ndarray:
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

    Returns
    -------
    np.ndarray
        float64 array of shape ``(k, k)``.

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
        order of each component's lowest row index.
    trusted_label : int
        Label of the component the trusted clients come from (-1 if there are no
        clients).
    mean_similarity : tuple[float, ...]
        Each client's cosine similarity to the mean direction of its own cluster (the
        quantity the chain guard checks), in row order: for a client the guard removed,
        the value at the moment of removal; for everyone else, the value for the final
        cluster.
    """

    trusted: tuple[int, ...]
    rejected: tuple[int, ...]
    reasons: tuple[str, ...]
    labels: tuple[int, ...]
    trusted_label: int
    mean_similarity: tuple[float, ...]


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


def screen_updates(
    similarity: np.ndarray,
    tau: float,
    stakes: Sequence[float] | np.ndarray | None = None,
    *,
    min_mean_similarity: float | None = 0.0,
) -> ScreeningResult:
    """Split clients into a trusted cluster and rejected outliers.

    Steps:

    1. Build the ``tau``-graph: an edge between clients ``i != j`` when
       ``similarity[i, j] >= tau``. Its connected components are the clusters, as in
       the paper.
    2. Chain guard (skipped when ``min_mean_similarity`` is None). Connected components
       are transitive: an attacker that is similar enough to one honest client, or a
       chain of attackers each similar to the next, joins the honest cluster while
       pointing away from it. So within each cluster, members whose cosine to the
       cluster's mean direction is below ``min_mean_similarity`` are removed, worst
       first, recomputing the mean each time. The default, 0, removes only members that
       point against the cluster's consensus direction; heterogeneous honest clients,
       whose updates still share the majority's direction, keep a positive cosine to
       the mean and stay. A stricter value (e.g. ``tau``) also removes weakly
       linked members.
    3. The largest refined cluster is trusted. Ties in size go to the larger total
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
        Minimum cosine to the cluster's mean direction (see step 2), or None for the
        paper's plain connected components.

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
    weights = (
        np.ones(num_clients) if stakes is None else np.asarray(stakes, dtype=np.float64).ravel()
    )
    if weights.shape != (num_clients,):
        raise ValueError(f"stakes must have {num_clients} entries, got {weights.size}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"stakes must be finite and >= 0, got {weights.tolist()}")
    if num_clients == 0:
        return ScreeningResult((), (), (), (), -1, ())

    adjacency = matrix >= tau
    np.fill_diagonal(adjacency, False)
    labels = _components(adjacency)
    num_labels = int(labels.max()) + 1

    kept: list[np.ndarray] = []
    mean_similarity = np.ones(num_clients)
    for label in range(num_labels):
        members = np.flatnonzero(labels == label)
        keep, cosines = _refine_by_mean_direction(
            matrix[np.ix_(members, members)], min_mean_similarity
        )
        mean_similarity[members] = cosines
        kept.append(members[keep])

    # Largest, then most stake, then lowest index (members are ascending, so [0] is min).
    best = min(
        range(num_labels),
        key=lambda lab: (-kept[lab].size, -math.fsum(weights[kept[lab]]), int(kept[lab][0])),
    )
    trusted_mask = np.zeros(num_clients, dtype=bool)
    trusted_mask[kept[best]] = True
    trusted = np.flatnonzero(trusted_mask)

    reasons: list[str] = []
    for i in range(num_clients):
        if trusted_mask[i]:
            reasons.append(
                f"trusted: in the largest cluster at tau={tau:.2f} "
                f"({trusted.size} of {num_clients} clients)"
            )
        elif labels[i] == best:
            reasons.append(
                f"cosine similarity to the trusted cluster's mean direction "
                f"{mean_similarity[i]:.2f} below {min_mean_similarity:.2f} "
                f"(linked into the cluster at tau={tau:.2f} only through a chain)"
            )
        else:
            closest = float(matrix[i, trusted].max())
            reasons.append(
                f"cosine similarity to trusted cluster below tau={tau:.2f} (max {closest:.2f})"
            )
    return ScreeningResult(
        trusted=tuple(int(i) for i in trusted),
        rejected=tuple(int(i) for i in np.flatnonzero(~trusted_mask)),
        reasons=tuple(reasons),
        labels=tuple(int(label) for label in labels),
        trusted_label=int(best),
        mean_similarity=tuple(float(x) for x in mean_similarity),
    )


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
