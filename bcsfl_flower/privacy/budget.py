"""Privacy budget: a client refuses DP-SGD training that would overspend ``dp-target-epsilon``.

Epsilon is a property of each client's own data, so the client that owns the data keeps
the budget: before each round it projects, with Opacus's RDP accountant, the epsilon it
would reach by training every remaining round of the run (worst case: it is sampled in
each), and refuses the round if that exceeds the target. At round 1 this refuses a run
that could not finish within the budget before any data is touched, and the message
names the noise multiplier that would fit. The server stops the run when every reply of
a round is such a refusal (:func:`~bcsfl_flower.protocol.all_refused_for_budget`), so an
exhausted federation ends with that message instead of rolling back its remaining
rounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bcsfl_flower.privacy.dp import projected_epsilon
from bcsfl_flower.protocol import BUDGET_REFUSAL


class PrivacyBudgetExceededError(RuntimeError):
    """Training would take a client past ``dp-target-epsilon``."""


@dataclass(frozen=True)
class PlannedTraining:
    """The DP-SGD steps a client would take in the rest of the run.

    Attributes
    ----------
    noise_multiplier : float
        The run's ``dp-noise-multiplier``.
    sample_rate : float
        Poisson sampling rate, ``1 / batches per epoch``.
    steps_per_round : int
        ``local-epochs`` times the batches per epoch.
    rounds : int
        Rounds left, this one included.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int


def check_budget(
    target_epsilon: float,
    delta: float,
    plan: PlannedTraining,
    state: Mapping[str, Sequence[float] | Sequence[int]] | None = None,
) -> float:
    """Return the projected epsilon at the end of the run, or refuse to train.

    Raises
    ------
    PrivacyBudgetExceededError
        If training ``plan.rounds`` more rounds would spend more than ``target_epsilon``.
        The message gives the projection and, for a client that has not trained yet,
        the noise multiplier that would keep the whole run within the target.
    """
    steps = plan.steps_per_round * plan.rounds
    epsilon = projected_epsilon(state, plan.noise_multiplier, plan.sample_rate, steps, delta)
    if epsilon <= target_epsilon:
        return epsilon
    advice = "this client stops training"
    if not state or not state.get("steps"):
        # Imported here, as Opacus is: only DP clients need it.
        from opacus.accountants.utils import get_noise_multiplier

        noise = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=plan.sample_rate,
            steps=steps,
        )
        advice = f"dp-noise-multiplier >= {noise:.2f} or fewer rounds would fit"
    raise PrivacyBudgetExceededError(
        f"{BUDGET_REFUSAL}: training the {plan.rounds} remaining round(s) would bring epsilon "
        f"to {epsilon:.2f} at delta {delta:g}, above dp-target-epsilon {target_epsilon:g}; "
        f"{advice}"
    )
