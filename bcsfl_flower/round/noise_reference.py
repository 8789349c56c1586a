"""The noise reference: what the trusted mean's own sampling error costs each validator.

Under client-side differential privacy the honest aggregate moves single validators'
losses far more than without it, enough for a fixed tolerance to vote down honest
rounds, and an isotropic perturbation of the noise's length explains only a tenth of
that (``docs/constants.md``): the swing comes from which clients, with their non-IID
data and their noisy, clipped gradients, the mean happens to contain.

So each validator measures that swing on the round itself. The trusted clients are
split at random into two halves ``A`` and ``B``; ``r = (mean_A - mean_B) / 2`` has the
covariance of the trusted mean's deviation from the mean of the clients' population
(half the variance of each half-mean, which each have twice the mean's), with no signal
in expectation. The committee scores ``w_t + r`` and ``w_t - r`` beside the candidates,
and each validator tolerates, on top of the fixed tolerance, the larger loss increase
of the two (:func:`noise_allowance`): what the aggregate's own sampling error can cost
it. A candidate that hurts it more than that is still voted down.

Both references are weightings of the updates, so they are built like candidates, in
plaintext or on CKKS ciphertexts, and a replay recomputes them. The split is drawn
from the previous model's hash and the round. What a client controls cannot widen
a validator's allowance by more than its clipped weight in the mean; a validator that
misreports the references only moves its own vote.
"""

from __future__ import annotations

import hashlib
import math
from typing import cast

import numpy as np

from bcsfl_flower.round.candidates import mean_coefficients
from bcsfl_flower.round.state import ValidatorReport

NOISE_REFERENCES = ("noise-reference-plus", "noise-reference-minus")
"""Names of ``w_t + r`` and ``w_t - r`` in the committee exchange (never candidates)."""


def reference_rng(previous_hash: bytes, server_round: int) -> np.random.Generator:
    """Return the generator of round ``server_round``'s split into halves."""
    digest = hashlib.sha256(previous_hash + server_round.to_bytes(8, "big")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def sampling_error_coefficients(
    trusted: np.ndarray | tuple[int, ...],
    weights: np.ndarray,
    clip: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Return ``r = (mean_A - mean_B) / 2`` for a random split of ``trusted`` into halves.

    With fewer than two trusted clients there is nothing to split, and ``r`` is zero.
    """
    rows = rng.permutation(np.asarray(trusted, dtype=np.int64))
    if rows.size < 2:
        return np.zeros(clip.size)
    half = rows.size // 2
    first = mean_coefficients(rows[:half], weights, clip)
    second = mean_coefficients(rows[half:], weights, clip)
    return cast(np.ndarray, (first - second) / 2)


def noise_allowance(report: ValidatorReport) -> float:
    """Return the larger loss increase the two references caused this validator (>= 0).

    A missing or non-finite reference loss counts as no increase, so a validator that
    does not report them keeps the fixed tolerance rather than an unbounded one.
    """
    raised = [-report.delta(name) for name in NOISE_REFERENCES]
    usable = [value for value in raised if math.isfinite(value)]
    return max([0.0, *usable])
