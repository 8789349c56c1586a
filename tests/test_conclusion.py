"""The one decision function: a statement's signed ballots decide the round, or abstain.

Every case is a validator's, or an operator's, way to make a ballot say something it
did not: each must turn that ballot into an abstention with a reason naming what is
wrong, and the decision must follow.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from bcsfl_flower.ballots import Ballot, SignedBallot, loss_bits
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.packets import Eip712Domain
from bcsfl_flower.round.conclusion import conclude, unsigned_ballot
from bcsfl_flower.round.state import ValidatorReport
from bcsfl_flower.round.statement import DecisionSettings, RoundStatement, StatedPlan, StatedReply

DOMAIN = Eip712Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", b"\x11" * 32)
VALIDATORS = [client_dev_account(i) for i in range(3)]
PREVIOUS = b"\x07" * 32
CANDIDATE = b"\x08" * 32
SETTINGS = DecisionSettings(3, 3, 0.0, 3.0, 0.0, 1.0, "trusted-mean", "plain")


def ballot(account, *, loss=0.5, round_number=1, previous=PREVIOUS, domain=DOMAIN, signer=None):
    """``account``'s ballot: 1.0 on w_t, ``loss`` on the candidate (accepts below 1.0)."""
    unsigned = Ballot(round_number, account.address, previous, (previous, CANDIDATE), (1.0, loss))
    if signer is None:
        return unsigned.sign(account, domain).to_fields()
    signature = bytes(signer.sign_message(unsigned.signable(domain)).signature)
    return SignedBallot(unsigned, signature).to_fields()  # another key signs in its name


def statement(ballots) -> RoundStatement:
    identities = tuple(a.address for a in VALIDATORS)
    return RoundStatement(
        round=1,
        previous_hash="0x" + PREVIOUS.hex(),
        settings=SETTINGS,
        stakes=dict.fromkeys(identities, 1.0),
        replies=tuple(
            StatedReply(str(10 + i), identity, 1.0, "0x" + bytes([i + 1]).hex() * 32)
            for i, identity in enumerate(identities)
        ),
        candidates=identities,
        validators=identities,
        plan=StatedPlan(
            names=("trusted-mean",),
            scored={"trusted-mean": "0x" + CANDIDATE.hex()},
            supports=((0, 1, 2),),
        ),
        ballots=tuple(ballots),
    )


def test_three_valid_ballots_commit_the_candidate_they_accept():
    decision, reports = conclude(statement([ballot(a) for a in VALIDATORS]), DOMAIN)
    assert decision.committed and decision.candidate == "trusted-mean"
    assert decision.votes_for == 3 and decision.quorum == 2
    assert [r.validator for r in reports] == ["10", "11", "12"]
    assert all(r.problems == () and r.candidate_losses["trusted-mean"] == 0.5 for r in reports)


def test_a_validator_that_rejects_counts_against_the_candidate():
    ballots = [
        ballot(VALIDATORS[0]),
        ballot(VALIDATORS[1], loss=2.0),
        ballot(VALIDATORS[2], loss=2.0),
    ]
    decision, _ = conclude(statement(ballots), DOMAIN)
    assert not decision.committed and decision.votes_for == 1


def edited_loss(fields):
    """The operator rewrites a loss in a signed ballot, keeping the signature."""
    return {**fields, "loss_bits": [fields["loss_bits"][0], loss_bits(0.1)]}


@pytest.mark.parametrize(
    ("forge", "problem"),
    [
        (lambda: edited_loss(ballot(VALIDATORS[2], loss=2.0)), "signed by"),
        (lambda: ballot(VALIDATORS[2], signer=VALIDATORS[0]), "signed by"),
        (lambda: ballot(client_dev_account(7)), "no ballot"),
        (lambda: ballot(VALIDATORS[2], round_number=2), "for round 2"),
        (lambda: ballot(VALIDATORS[2], previous=b"\x09" * 32), "starts from 0x0909"),
        (
            lambda: ballot(VALIDATORS[2], domain=dataclasses.replace(DOMAIN, run=bytes(32))),
            "another run",
        ),
        (
            lambda: unsigned_ballot(
                VALIDATORS[2].address, ValidatorReport("12", 1.0, {"trusted-mean": 0.5})
            ),
            "its ballot is unsigned",
        ),
        (lambda: {**ballot(VALIDATORS[2]), "signature": "0x1234"}, "malformed ballot"),
    ],
)
def test_a_forged_ballot_abstains_and_names_what_is_wrong(forge, problem):
    """Validator 2 rejected (or cast nothing); a forged accept must not make the quorum."""
    ballots = [ballot(VALIDATORS[0]), ballot(VALIDATORS[1], loss=2.0), forge()]
    decision, reports = conclude(statement(ballots), DOMAIN)
    assert not decision.committed
    assert decision.votes_for == 1
    assert math.isnan(reports[2].candidate_losses["trusted-mean"])
    assert problem in reports[2].problems[0]


def test_two_ballots_from_one_validator_both_abstain():
    ballots = [ballot(VALIDATORS[0]), ballot(VALIDATORS[1]), ballot(VALIDATORS[1], loss=0.4)]
    decision, reports = conclude(statement(ballots), DOMAIN)
    assert "2 ballots, not one" in reports[1].problems[0]
    assert "no ballot" in reports[2].problems[0]
    assert not decision.committed


def test_without_an_audit_trail_only_unsigned_identities_vote():
    unsigned = [
        unsigned_ballot(f"node:{10 + i}", ValidatorReport(str(10 + i), 1.0, {"trusted-mean": 0.5}))
        for i in range(3)
    ]
    stated = dataclasses.replace(
        statement(unsigned),
        replies=tuple(
            dataclasses.replace(r, identity=f"node:{r.node}") for r in statement([]).replies
        ),
        validators=tuple(f"node:{10 + i}" for i in range(3)),
        candidates=(),
    )
    decision, _ = conclude(stated, None)
    assert decision.committed
    _, reports = conclude(statement([ballot(a) for a in VALIDATORS]), None)
    assert all("no audit trail" in r.problems[0] for r in reports)


def test_a_statement_without_candidates_rolls_back():
    decision, reports = conclude(dataclasses.replace(statement([]), plan=None), DOMAIN)
    assert not decision.committed and reports == ()
    assert decision.reason == "rollback: no candidates"
