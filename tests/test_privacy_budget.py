"""The privacy budget: projected epsilon, refusals, and the server's stop rule."""

import pytest

from bcsfl_flower.privacy.budget import (
    PlannedTraining,
    PrivacyBudgetExceededError,
    check_budget,
)
from bcsfl_flower.privacy.dp import epsilon_from_state, projected_epsilon
from bcsfl_flower.protocol import BUDGET_REFUSAL, all_refused_for_budget

DELTA = 1e-5
# MNIST partition of ~2,700 examples in batches of 32: 85 batches, one epoch a round.
PLAN = PlannedTraining(noise_multiplier=1.0, sample_rate=1 / 85, steps_per_round=85, rounds=20)


def test_the_projection_is_the_accountants_epsilon_of_the_history_plus_the_planned_steps():
    history = {"noise_multipliers": [1.0], "sample_rates": [1 / 85], "steps": [170]}
    planned = projected_epsilon(history, 1.0, 1 / 85, 255, DELTA)
    together = {"noise_multipliers": [1.0, 1.0], "sample_rates": [1 / 85] * 2, "steps": [170, 255]}
    assert planned == pytest.approx(epsilon_from_state(together, DELTA))
    assert projected_epsilon(history, 1.0, 1 / 85, 0, DELTA) == pytest.approx(
        epsilon_from_state(history, DELTA)
    )
    assert projected_epsilon(None, 1.0, 1 / 85, 0, DELTA) == 0.0
    assert projected_epsilon(None, 1.0, 1 / 85, 85, DELTA) < planned  # spending only grows


def test_a_run_within_the_budget_is_allowed_and_its_projection_returned():
    epsilon = check_budget(100.0, DELTA, PLAN)
    assert 0 < epsilon <= 100.0
    assert epsilon == pytest.approx(projected_epsilon(None, 1.0, 1 / 85, 85 * 20, DELTA))


def test_a_run_past_the_budget_is_refused_before_training_with_the_noise_that_would_fit():
    with pytest.raises(PrivacyBudgetExceededError) as refused:
        check_budget(1.0, DELTA, PLAN)
    message = str(refused.value)
    assert message.startswith(BUDGET_REFUSAL)
    assert "20 remaining round(s)" in message and "dp-target-epsilon 1" in message
    suggested = float(message.split("dp-noise-multiplier >= ")[1].split()[0])
    assert suggested > 1.0
    # The suggested noise keeps the whole run within the target (Opacus's 1% tolerance).
    assert projected_epsilon(None, suggested + 0.005, 1 / 85, 85 * 20, DELTA) <= 1.0 * 1.01


def test_a_client_that_already_trained_is_told_to_stop_not_given_a_noise_level():
    history = {"noise_multipliers": [1.0], "sample_rates": [1 / 85], "steps": [85 * 10]}
    spent = epsilon_from_state(history, DELTA)
    remaining = PlannedTraining(1.0, 1 / 85, 85, rounds=10)
    with pytest.raises(PrivacyBudgetExceededError, match="this client stops training"):
        check_budget(spent * 1.01, DELTA, remaining, history)
    one_more = PlannedTraining(1.0, 1 / 85, 85, rounds=1)
    assert check_budget(spent * 1.5, DELTA, one_more, history) > spent


def test_the_server_stops_only_when_every_reason_is_a_budget_refusal():
    refusal = f"error reply: Exception: {BUDGET_REFUSAL}: training the 3 remaining round(s)"
    assert all_refused_for_budget([refusal, refusal])
    assert not all_refused_for_budget([refusal, "error reply: node crashed"])
    assert not all_refused_for_budget([])
