"""The noise reference: what pure noise of the candidate's size does to each validator.

Under client-side differential privacy every update carries Gaussian noise, and the
noise, not the signal, sets how far a validator's loss moves from round to round: on
the grid's federation at noise multiplier 2 (batch 256) honest aggregates moved single
validators' losses by up to 0.6 either way, so a fixed tolerance of 0.05 voted down 3
of 20 honest rounds. A validator cannot tell from one loss whether a candidate is
poisoned or merely noisy, but it can measure how much noise alone costs it: the
committee also evaluates ``w_t + xi``, where ``xi`` is an isotropic Gaussian direction
as long as the noise the preferred candidate would carry if its updates shared no
direction, ``sqrt(sum_k a_k^2 ||d_k||^2)``. That bound is what DP noise is (independent,
isotropic, of the clients' full update norm when noise dominates), it needs only the
Gram matrix's diagonal, and it is small without DP, where updates are far shorter.

Each validator then tolerates the loss increase the reference caused it, on top of the
fixed tolerance (:func:`noise_allowance`). A candidate that hurts a validator more than
noise of its own size is still voted down. What a client controls cannot widen the
allowance much: the reference uses the clipped coefficients of the trusted clients
only, so one client adds at most its weight times the norm bound; a validator that
misreports the reference only moves its own vote.

The direction is drawn from the previous model's hash and the round, so anyone
replaying the round draws the same reference.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from bcsfl_flower.round.state import ValidatorReport

NOISE_REFERENCE = "noise-reference"
"""Name of the reference model in the committee exchange (never a candidate)."""


def reference_norm(gram: np.ndarray, coefficients: np.ndarray) -> float:
    """Return ``sqrt(sum_k a_k^2 G_kk)``: the candidate's norm if no two updates aligned.

    This is the norm of ``sum_k a_k n_k`` for independent noise vectors ``n_k`` as long
    as the updates, which is what each update's DP noise is once it dominates.
    """
    diagonal = np.clip(np.diag(gram), 0.0, None)
    return float(np.sqrt(np.square(coefficients) @ diagonal))


def reference_rng(previous_hash: bytes, server_round: int) -> np.random.Generator:
    """Return the generator of round ``server_round``'s reference direction."""
    digest = hashlib.sha256(previous_hash + server_round.to_bytes(8, "big")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def reference_step(size: int, norm: float, rng: np.random.Generator) -> np.ndarray:
    """Return a uniformly random direction of ``size`` coordinates and length ``norm``."""
    direction = rng.standard_normal(size)
    length = float(np.linalg.norm(direction))
    return (direction * (norm / length if length else 0.0)).astype(np.float32)


def noise_allowance(report: ValidatorReport) -> float:
    """Return how much the noise reference raised this validator's loss (0 if it did not).

    A missing or non-finite reference loss allows nothing: the validator falls back to
    the fixed tolerance rather than an unbounded one.
    """
    raised = -report.delta(NOISE_REFERENCE)
    return raised if math.isfinite(raised) and raised > 0 else 0.0
