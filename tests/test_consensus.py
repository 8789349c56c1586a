"""Tests for two-thirds quorums, vote tallies and quorum certificates."""

from fractions import Fraction
from math import ceil

import numpy as np
import pytest
from eth_account import Account

from bcsfl_flower.consensus import (
    TRUSTED_MEAN_CANDIDATE,
    ConsensusDecision,
    QuorumCertificate,
    quorum_size,
    tally_accepts,
    tally_votes,
)


# ----- quorum_size ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 4), (6, 4), (7, 5), (9, 6), (10, 7)]
)
def test_quorum_boundary_table(n, quorum):
    assert quorum_size(n) == quorum


def test_quorum_is_exact_ceiling_of_two_thirds():
    for n in range(1, 3001):
        q = quorum_size(n)
        assert q == ceil(Fraction(2 * n, 3))
        assert 3 * q >= 2 * n > 3 * (q - 1)  # q approvals reach 2/3, q - 1 do not


@pytest.mark.parametrize(
    ("n", "error"), [(0, ValueError), (-3, ValueError), (True, TypeError), (3.0, TypeError)]
)
def test_quorum_rejects_bad_sizes(n, error):
    with pytest.raises(error):
        quorum_size(n)


# ----- tally_votes (paper mode) ---------------------------------------------------------
def ballots(num_for, num_other=0, num_abstain=0, candidate="c1"):
    votes = {}
    for _ in range(num_for):
        votes[f"v{len(votes)}"] = candidate
    for i in range(num_other):
        votes[f"v{len(votes)}"] = f"other{i % 2}"
    for _ in range(num_abstain):
        votes[f"v{len(votes)}"] = None
    return votes


@pytest.mark.parametrize("n", range(1, 10))
def test_votes_at_quorum_commit_and_one_below_roll_back(n):
    q = quorum_size(n)
    # One vote short; the rest abstain (voting for another candidate could reach its own
    # quorum when n is small).
    below = tally_votes(ballots(q - 1, num_abstain=n - q + 1), n)
    assert not below.committed
    assert below.candidate is None
    assert below.quorum == q and below.num_validators == n
    assert below.reason.startswith("rollback")

    at = tally_votes(ballots(q, num_other=n - q), n)  # n - q < q: others cannot commit
    assert at.committed
    assert at.candidate == "c1"
    assert at.votes_for == q
    assert at.reason == f"commit: {q}/{n} votes for candidate 'c1', quorum {q}"


def test_split_vote_rolls_back():
    decision = tally_votes({"a": "x", "b": "x", "c": "x", "d": "y", "e": "y", "f": "y"}, 6)
    assert decision == ConsensusDecision(
        committed=False,
        candidate=None,
        votes_for=3,
        quorum=4,
        num_validators=6,
        reason="rollback: no candidate reached quorum 4 of 6 validators "
        "(votes 'x': 3, 'y': 3; 0 abstained or did not reply)",
    )


def test_abstentions_and_dropouts_count_against():
    # Unanimous among those who voted, but 2 abstained and 1 dropped out of 6 drawn.
    decision = tally_votes({"a": "x", "b": "x", "c": "x", "d": None, "e": None}, 6)
    assert not decision.committed
    assert decision.votes_for == 3
    assert "3 abstained or did not reply" in decision.reason
    # The same three votes commit when only four validators were drawn.
    assert tally_votes({"a": "x", "b": "x", "c": "x"}, 4).committed


def test_no_replies_and_no_validators_roll_back_with_reason():
    nobody = tally_votes({}, 5)
    assert not nobody.committed and nobody.votes_for == 0 and nobody.quorum == 4
    assert nobody.reason.startswith("rollback: no validator replied")
    abstained = tally_votes({"a": None, "b": None}, 2)
    assert not abstained.committed
    assert "abstained" in abstained.reason
    empty = tally_votes({}, 0)
    assert not empty.committed and empty.quorum == 0
    assert empty.reason == "rollback: no validators in the committee"


@pytest.mark.parametrize(
    ("votes", "n", "error"),
    [
        ({"a": "x", "b": "x"}, 1, ValueError),
        ({"a": "x"}, -1, ValueError),
        ({"a": "x"}, 2.0, TypeError),
        ({"a": 3}, 2, TypeError),
        ({"a": ""}, 2, TypeError),
        ({1: "x"}, 2, TypeError),
    ],
)
def test_tally_votes_rejects_bad_input(votes, n, error):
    with pytest.raises(error):
        tally_votes(votes, n)


# ----- tally_accepts (trusted-mean mode) ------------------------------------------------
@pytest.mark.parametrize("n", range(1, 10))
def test_accepts_at_quorum_commit_and_one_below_roll_back(n):
    q = quorum_size(n)
    below = {f"v{i}": i < q - 1 for i in range(n)}
    at = {f"v{i}": i < q for i in range(n)}
    assert not tally_accepts(below, n).committed
    decision = tally_accepts(at, n)
    assert decision.committed
    assert decision.candidate == TRUSTED_MEAN_CANDIDATE
    assert decision.votes_for == q


def test_accept_reasons_and_dropouts():
    decision = tally_accepts(
        {"a": True, "b": True, "c": True, "d": False, "e": False, "f": False}, 6
    )
    assert decision.reason == "rollback: 3/6 accept votes, quorum 4"
    dropped = tally_accepts({"a": True, "b": True, "c": True}, 6, candidate="mean")
    assert not dropped.committed
    assert dropped.reason == "rollback: 3/6 accept votes, quorum 4, 3 did not reply"
    committed = tally_accepts(
        {"a": True, "b": np.True_, "c": True, "d": False}, 4, candidate="mean"
    )
    assert committed.committed and committed.candidate == "mean"
    assert committed.reason == "commit: 3/4 accept votes, quorum 3"
    assert tally_accepts({}, 3).reason.startswith("rollback: no validator replied")
    assert tally_accepts({}, 0).reason == "rollback: no validators in the committee"


@pytest.mark.parametrize(
    ("accepts", "n", "kwargs", "error"),
    [
        ({"a": True, "b": True}, 1, {}, ValueError),
        ({"a": 1}, 1, {}, TypeError),
        ({"a": "yes"}, 1, {}, TypeError),
        ({"a": True}, 1, {"candidate": ""}, TypeError),
    ],
)
def test_tally_accepts_rejects_bad_input(accepts, n, kwargs, error):
    with pytest.raises(error):
        tally_accepts(accepts, n, **kwargs)


# ----- QuorumCertificate ----------------------------------------------------------------
ADDRESSES = [Account.from_key(bytes([i + 1]) * 32).address for i in range(5)]
MODEL_HASH = bytes(range(32))
PREVIOUS_HASH = bytes(range(32, 64))


def certificate(num_signers, **overrides):
    fields = {
        "server_round": 3,
        "model_hash": MODEL_HASH,
        "previous_hash": PREVIOUS_HASH,
        "signers": tuple(ADDRESSES[:num_signers]),
        "signatures": tuple(bytes([i]) * 65 for i in range(num_signers)),
    }
    fields.update(overrides)
    return QuorumCertificate(**fields)


@pytest.mark.parametrize("num_miners", range(1, 6))
def test_certificate_completeness_boundary(num_miners):
    q = quorum_size(num_miners)
    assert certificate(q).is_complete(num_miners)
    assert not certificate(q - 1).is_complete(num_miners)


def test_certificate_to_dict():
    record = certificate(2).to_dict()
    assert record["server_round"] == 3
    assert record["model_hash"] == "0x" + MODEL_HASH.hex()
    assert record["previous_hash"] == "0x" + PREVIOUS_HASH.hex()
    assert record["signers"] == ADDRESSES[:2]
    assert record["signatures"] == ["0x" + "00" * 65, "0x" + "01" * 65]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"server_round": -1}, ValueError, "server_round"),
        ({"server_round": 1.0}, TypeError, "server_round"),
        ({"model_hash": MODEL_HASH[:31]}, ValueError, "model_hash"),
        ({"previous_hash": PREVIOUS_HASH.hex()}, ValueError, "previous_hash"),
        ({"signers": (ADDRESSES[0].lower(), ADDRESSES[1])}, ValueError, "checksummed"),
        ({"signers": ("0x1234", ADDRESSES[1])}, ValueError, "checksummed"),
        ({"signers": (ADDRESSES[0], ADDRESSES[0])}, ValueError, "duplicates"),
        ({"signers": tuple(ADDRESSES[:1])}, ValueError, "1 signers but 2 signatures"),
        ({"signatures": (b"\x00" * 65, b"\x00" * 64)}, ValueError, "65 bytes"),
        ({"signers": list(ADDRESSES[:2])}, TypeError, "tuples"),
    ],
)
def test_certificate_rejects_bad_fields(overrides, error, match):
    with pytest.raises(error, match=match):
        certificate(2, **overrides)


def test_certificate_with_more_signers_than_miners_is_an_error():
    with pytest.raises(ValueError, match="3 signers but only 2 miners"):
        certificate(3).is_complete(2)
    with pytest.raises(ValueError):
        certificate(1).is_complete(0)
