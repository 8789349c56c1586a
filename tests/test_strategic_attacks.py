"""Attacks on BCSFL's committee, validators and decision, and the sealed set's verdicts."""

import numpy as np
import pytest
import torch

from sim.robust.attacks import BallotView, RoundView
from sim.robust.evaluation_report import _failures, judge
from sim.robust.evaluation_set import Configuration
from sim.robust.strategic_attacks import (
    SLEEPER_SEATS,
    DecisionOptimiser,
    ProjectedBackdoor,
    Sleeper,
    ValidatorsOwnGroup,
    ValidatorsReject,
    ValidatorsWithhold,
)
from sim.robust.tasks import stamp_trigger

DIM = 30


def _view(rng, decide=None):
    honest = rng.normal(size=DIM) + 0.3 * rng.normal(size=(12, DIM))
    own = 3.0 * (rng.normal(size=DIM) + 0.3 * rng.normal(size=(4, DIM)))
    return RoundView(3, honest, own, lambda v: v.mean(axis=0), rng, decide=decide)


def _ballot(loss=1.0, baseline=1.2, is_global=False, objective=2.0):
    return BallotView(3, loss, baseline, is_global, lambda: objective)


def test_a_sleeper_attacks_only_in_rounds_where_it_holds_enough_seats():
    rng = np.random.default_rng(0)
    sleeper = Sleeper()
    view = _view(rng)
    sleeper.begin_round(3, SLEEPER_SEATS - 1)
    np.testing.assert_array_equal(sleeper.updates(view), view.own)
    assert sleeper.ballot(_ballot(loss=1.0)) == 1.0  # honest vote
    sleeper.begin_round(4, SLEEPER_SEATS)
    sent = sleeper.updates(view)
    assert not np.allclose(sent, view.own) and np.allclose(sent, sent[0])
    assert sleeper.ballot(_ballot(loss=1.0, baseline=1.2)) == pytest.approx(1.4)  # colludes


def test_strategic_validators_reject_withhold_or_score_their_own_objective():
    assert ValidatorsReject().ballot(_ballot(is_global=True)) == 1.0
    assert ValidatorsReject().ballot(_ballot(loss=0.5, baseline=1.2)) > 1.2
    assert ValidatorsWithhold().ballot(_ballot()) is None
    assert ValidatorsOwnGroup().ballot(_ballot(objective=0.25)) == 0.25
    assert ValidatorsWithhold().training(1) == ValidatorsOwnGroup().training(1) == "flip"


def test_the_decision_optimiser_sends_what_moves_the_decided_step_furthest():
    rng = np.random.default_rng(1)
    probes = []

    def decide(attack):  # a decision that drops anything longer than 3x the honest mean
        probes.append(attack[0])
        step = attack[0] if np.linalg.norm(attack[0]) < 3 * np.linalg.norm(honest_mean) else 0
        return honest_mean + 0.2 * (step - honest_mean)

    view = _view(rng, decide)
    honest_mean = view.honest.mean(axis=0)
    sent = DecisionOptimiser().updates(view)
    assert len(probes) >= 10 and sent.shape == view.own.shape
    tried = list(probes)
    damage = [np.linalg.norm(decide(np.atleast_2d(p)) - honest_mean) for p in tried]
    assert np.linalg.norm(sent[0]) < 3 * np.linalg.norm(honest_mean)  # stayed under the cut
    assert np.linalg.norm(decide(sent) - honest_mean) == pytest.approx(max(damage))


def test_the_projected_backdoor_never_exceeds_the_honest_median_norm():
    rng = np.random.default_rng(2)
    view = _view(rng)
    sent = ProjectedBackdoor().updates(view)
    radius = np.median(np.linalg.norm(view.honest, axis=1))
    assert np.all(np.linalg.norm(sent, axis=1) <= radius * (1 + 1e-9))
    cosines = np.sum(sent * view.own, axis=1) / (
        np.linalg.norm(sent, axis=1) * np.linalg.norm(view.own, axis=1)
    )
    np.testing.assert_allclose(cosines, 1.0)  # the direction is the backdoor's own


def test_dba_quadrants_tile_the_whole_trigger():
    images = torch.zeros((1, 1, 28, 28))
    images[0, 0, 0, 0] = 1.0  # the trigger is as bright as the brightest pixel
    whole = stamp_trigger(images)
    parts = [stamp_trigger(images, part) for part in range(4)]
    assert all(int((p > 0).sum()) == 1 + 4 for p in parts)
    assert int((whole > 0).sum()) == 1 + 16
    torch.testing.assert_close(torch.stack(parts).amax(dim=0), whole)


CONFIG = Configuration("e99", "logreg", 0.1, 10, 20, None, 0.05, 1, 32, 0.3, "backdoor", (7,))


def _row(strategy, accuracy, backdoor=None, **bcsfl):
    base = {
        "model": "logreg",
        "alpha": 0.1,
        "clients": 10,
        "rounds": 20,
        "max_train": None,
        "learning_rate": 0.05,
        "epochs": 1,
        "batch_size": 32,
        "attack": "backdoor",
        "share": 0.3,
        "seed": 7,
        "strategy": strategy,
        "accuracy": accuracy,
        "backdoor": backdoor,
    }
    return {**base, **bcsfl}


def test_a_configuration_is_lost_on_backdoor_success_whatever_its_accuracy():
    ours = {"honest_rejected": 0.0, "honest_max_to_median": 1.0, "rollbacks": 0, "validators": 9}
    rows = [
        _row("fedavg", 0.80, 0.99),
        _row("flame", 0.79, 0.10),
        _row("bcsfl", 0.85, 0.15, **ours),
    ]
    verdict = judge(CONFIG, rows)
    assert verdict.lost and "backdoor success 15.0%" in verdict.failures[0]
    rows[-1] = _row("bcsfl", 0.85, 0.05, **ours)
    assert not judge(CONFIG, rows).lost


def test_no_tolerance_passes_a_clean_loss_beyond_two_points_or_a_spiral_of_exclusion():
    clean = Configuration("e98", "logreg", 0.1, 10, 20, None, 0.05, 1, 32, 0.0, "clean", (7,))
    ours = {"honest_rejected": 0.12, "honest_max_to_median": 1.0, "rollbacks": 3, "validators": 9}
    rows = [
        {**_row("fedavg", 0.90), "attack": "clean", "share": 0.0},
        {**_row("bcsfl", 0.879, **ours), "attack": "clean", "share": 0.0},
    ]
    failures = _failures(judge(clean, rows))
    assert [f.split(" ")[0] for f in failures] == ["accuracy", "12%", "3"]


def test_a_clean_federation_of_twenty_must_spread_its_committee_over_fifteen_validators():
    clean = Configuration("e97", "logreg", 0.1, 20, 20, None, 0.05, 1, 32, 0.0, "clean", (7,))
    fields = {"clients": 20, "attack": "clean", "share": 0.0}
    ours = {"honest_rejected": 0.0, "honest_max_to_median": 1.0, "rollbacks": 0}
    rows = [{**_row("fedavg", 0.90), **fields}, {**_row("bcsfl", 0.90, **ours), **fields}]
    rows[1]["validators"] = 14
    assert judge(clean, rows).failures == ("14 distinct validators",)
    rows[1]["validators"] = 15
    assert not judge(clean, rows).lost
