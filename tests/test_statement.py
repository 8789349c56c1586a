"""Round state statements: encoding, the committee redraw, and what ``verify`` does with them.

The chain tests run on the embedded chain (a real EVM in process) with real signatures;
the statements are built the way the pipeline builds them, and the committee is the one
:func:`redraw` gives, so a test that swaps it is a malicious operator's move.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from chain_fixtures import GENESIS, clients, toy_model

from bcsfl_flower.audit.replay import ReplayMismatchError, _load_model
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.ballots import Ballot, SignedBallot
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.backends import connect
from bcsfl_flower.chain.certificates import AnchorCertificate
from bcsfl_flower.chain.model_store import ModelIntegrityError, ModelStore
from bcsfl_flower.packets import Eip712Domain, ModelPacket, model_hash
from bcsfl_flower.round.conclusion import record_ballot_faults
from bcsfl_flower.round.settings import RoundSettings
from bcsfl_flower.round.settlement import stated_settlement
from bcsfl_flower.round.statement import (
    DecisionSettings,
    RoundStatement,
    StatedPlan,
    StatedReply,
    by_node,
    identity_of,
    packet_fields,
    redraw,
)

ACCOUNTS = clients(8)
NUM_CLIENTS = len(ACCOUNTS)
SETTINGS = DecisionSettings.of(
    RoundSettings(num_validators=3, num_miners=3), "trusted-mean", "plain"
)


def statement_for(
    round_number: int,
    previous: bytes,
    stakes: dict[str, float],
    domain: Eip712Domain | None = None,
    losses: tuple[float, ...] = (0.5, 0.5, 0.5),
    repliers: int = NUM_CLIENTS,
) -> RoundStatement:
    """A round whose first ``repliers`` (default: all 8) signed replies are all trusted,
    with its committee drawn.

    With ``domain``, its one candidate is ``toy_model(round_number)`` and the drawn
    validators' ballots score it at ``losses`` (against 1.0 for ``w_t``): with the
    default, they commit it.
    """
    replies = tuple(
        StatedReply(str(100 + i), a.address, 50.0, "0x" + bytes([i + 1]).hex() * 32)
        for i, a in enumerate(ACCOUNTS[:repliers])
    )
    statement = RoundStatement(
        round=round_number,
        previous_hash="0x" + previous.hex(),
        settings=SETTINGS,
        stakes=stakes,
        replies=replies,
        candidates=tuple(r.identity for r in replies),
        model_keys=("w", "b"),
    )
    drawn = redraw(statement)
    statement = dataclasses.replace(statement, validators=drawn.validators, miners=drawn.miners)
    return statement if domain is None else with_ballots(statement, domain, losses)


def with_ballots(
    statement: RoundStatement, domain: Eip712Domain, losses: tuple[float, ...], signers=None
) -> RoundStatement:
    """``statement`` with its candidate and each drawn validator's ballot of ``losses``.

    ``signers`` (default: the validators themselves) sign each ballot.
    """
    candidate = model_hash(toy_model(float(statement.round)))
    previous = bytes.fromhex(statement.previous_hash[2:])
    account = {a.address: a for a in ACCOUNTS}
    ballots = []
    for index, validator in enumerate(statement.validators):
        ballot = Ballot(
            statement.round, validator, previous, (previous, candidate), (1.0, losses[index])
        )
        signer = account[validator] if signers is None else signers[index]
        signature = bytes(signer.sign_message(ballot.signable(domain)).signature)
        ballots.append(SignedBallot(ballot, signature).to_fields())
    plan = StatedPlan(
        names=("trusted-mean",),
        scored={"trusted-mean": "0x" + candidate.hex()},
        supports=(tuple(range(len(statement.replies))),),
    )
    return dataclasses.replace(statement, plan=plan, ballots=tuple(ballots))


EQUAL = {a.address: 1.0 for a in ACCOUNTS}


def test_statement_round_trips_byte_for_byte_and_hashes_its_encoding():
    statement = statement_for(3, GENESIS, {**EQUAL, ACCOUNTS[0].address: 0.1 + 0.2})
    data = statement.to_bytes()
    again = RoundStatement.from_bytes(data)
    assert again == statement and again.to_bytes() == data
    assert again.stakes[ACCOUNTS[0].address] == 0.1 + 0.2  # floats survive exactly
    assert len(statement.digest()) == 32
    changed = dataclasses.replace(statement, stakes={**statement.stakes, ACCOUNTS[1].address: 2.0})
    assert changed.digest() != statement.digest()


def test_statement_rejects_bad_stakes_and_unstaked_candidates():
    with pytest.raises(ValueError, match="finite"):
        statement_for(1, GENESIS, {**EQUAL, ACCOUNTS[0].address: math.nan})
    missing = dict(EQUAL)
    del missing[ACCOUNTS[2].address]
    with pytest.raises(ValueError, match="no stake"):
        statement_for(1, GENESIS, missing)
    with pytest.raises(ValueError, match="format"):
        RoundStatement.from_bytes(json.dumps({"format": "other"}).encode())
    with pytest.raises(ValueError, match="not a round statement"):
        RoundStatement.from_bytes(b"{")


def test_redraw_depends_on_stakes_round_and_previous_hash_and_maps_to_nodes():
    base = statement_for(1, GENESIS, EQUAL)
    assert redraw(base).miners == base.miners  # the same call, the same committee
    heavy = {**EQUAL, **{a.address: 100.0 for a in ACCOUNTS[5:]}}
    draws = {
        redraw(statement_for(1, GENESIS, heavy)).miners,
        redraw(statement_for(2, GENESIS, EQUAL)).miners,
        redraw(statement_for(1, model_hash(toy_model(9.0)), EQUAL)).miners,
        base.miners,
    }
    assert len(draws) == 4
    nodes = by_node(redraw(base), base.node_of())
    assert {int(n) for n in nodes.miners} <= set(range(100, 108))
    assert identity_of("7", None) == "node:7" and identity_of("7", "0xA") == "0xA"


def test_store_refuses_a_modified_document(tmp_path):
    store = ModelStore(tmp_path)
    digest = store.save_document(b'{"a":1}')
    assert store.load_document(digest) == b'{"a":1}'
    (tmp_path / f"{digest.hex()}.json").write_bytes(b'{"a":2}')
    with pytest.raises(ModelIntegrityError, match="modified"):
        store.load_document(digest)
    with pytest.raises(FileNotFoundError):
        store.load_document(bytes(32))


# -- verify against the chain ---------------------------------------------------------------


def anchor(trail: AuditTrail, store: ModelStore, statement: RoundStatement, miners) -> None:
    """Store the statement and the round's model, then anchor it signed by ``miners``."""
    digest = store.save_document(statement.to_bytes())
    store.save(toy_model(float(statement.round)))
    approval = trail.prepare_approval(
        statement.round,
        model_hash(toy_model(float(statement.round))),
        bytes(32),
        [m.address for m in miners],
        digest,
        timestamp=1_700_000_000,
    )
    signatures = {m.address: approval.sign(m, trail.domain) for m in miners}
    trail.anchor_round(
        AnchorCertificate.build(approval, [m.address for m in miners], signatures, trail.domain)
    )


def run(tmp_path: Path, tamper, restake=None, drop=(), repliers=NUM_CLIENTS) -> list[str]:
    """Anchor rounds 1 and 2 (round 2 through ``tamper``); return verify's failures.

    Round 2's stake table is the one round 1 settled, changed by ``restake`` if given
    and without the identities in ``drop``.
    """
    store = ModelStore(tmp_path / "models")
    store.save(toy_model(0.0))
    by_address = {a.address: a for a in ACCOUNTS}
    with connect("embedded", tmp_path / "chain") as connection:
        trail = AuditTrail.open(connection, GENESIS)
        trail.register_clients({a.address: 1 for a in ACCOUNTS})
        first = statement_for(1, GENESIS, EQUAL, trail.domain)
        anchor(trail, store, first, [by_address[m] for m in first.miners])
        stakes = dict(stated_settlement(first, True, trail.domain).after)
        stakes.update(restake or {})
        stakes = {who: stake for who, stake in stakes.items() if who not in drop}
        second = statement_for(
            2, model_hash(toy_model(1.0)), stakes, trail.domain, repliers=repliers
        )
        tamper(trail, store, second, by_address)
        trail.write_manifest(tmp_path / "chain.json", store.root)
        report = verify_trail(trail, ChainManifest.load(tmp_path / "chain.json"))
    return [failure.message for failure in report.failures]


def honest(trail, store, statement, by_address):
    anchor(trail, store, statement, [by_address[m] for m in statement.miners])


def test_verify_passes_when_every_committee_is_the_draw(tmp_path):
    assert run(tmp_path, honest) == []


def test_verify_fails_on_a_tampered_stake_table(tmp_path):
    def tampered(trail, store, statement, by_address):
        honest(trail, store, statement, by_address)
        path = store.root / f"{statement.digest().hex()}.json"
        raw = json.loads(path.read_bytes())
        raw["stakes"][ACCOUNTS[3].address] = 5.0  # one client's stake, raised after signing
        path.write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())

    failures = run(tmp_path, tampered)
    assert len(failures) == 1
    assert failures[0].startswith("round 2: state statement") and "modified" in failures[0]


def test_verify_fails_when_a_signed_stake_table_is_not_the_last_settlement(tmp_path):
    # The operator states (and the miners sign) a table that favours one client.
    failures = run(tmp_path, honest, restake={ACCOUNTS[3].address: 5.0})
    assert len(failures) == 1
    assert failures[0].startswith("round 2: the stake table is not round 1's settlement")
    assert f"{ACCOUNTS[3].address} has 5.0, settled 1.05" in failures[0]


PHANTOM = "0x" + "ab" * 20


def test_verify_fails_on_a_signed_phantom_stake_entry(tmp_path):
    # An identity nobody registered, that never replied, enters the table with stake 50.
    failures = run(tmp_path, honest, restake={PHANTOM: 50.0})
    assert failures == [
        f"round 2: the stake table holds {PHANTOM}, neither in round 1's settlement nor "
        "replying in round 2"
    ]


def test_verify_fails_on_a_signed_stake_table_that_drops_a_client(tmp_path):
    # The last client does not reply in round 2, and its entry is left out.
    assert run(tmp_path / "kept", honest, repliers=7) == []
    failures = run(tmp_path / "dropped", honest, drop={ACCOUNTS[7].address}, repliers=7)
    assert f"round 2: the stake table drops {ACCOUNTS[7].address}, settled by round 1" in failures


def test_verify_fails_when_the_operator_anchors_a_swapped_committee(tmp_path):
    def swapped(trail, store, statement, by_address):
        outsiders = [a for a in ACCOUNTS if a.address not in statement.miners][:3]
        anchor(trail, store, statement, outsiders)  # valid signatures, wrong miners

    failures = run(tmp_path, swapped)
    assert len(failures) == 1
    assert failures[0].startswith("round 2: the anchored committee")


def test_verify_fails_when_the_statement_records_a_committee_the_draw_does_not_give(tmp_path):
    def forged(trail, store, statement, by_address):
        outsiders = tuple(a.address for a in ACCOUNTS if a.address not in statement.miners)[:3]
        forged = dataclasses.replace(statement, miners=outsiders)  # signed, but not drawn
        anchor(trail, store, forged, [by_address[m] for m in outsiders])

    failures = run(tmp_path, forged)
    assert len(failures) == 1
    assert "is not the stake-weighted draw" in failures[0]


@pytest.mark.parametrize("edit", ["loss", "drop", "swap"])
def test_verify_fails_on_an_edited_deleted_or_swapped_ballot(tmp_path, edit):
    """A stored ballot is part of the statement the miners signed: no edit goes unseen."""

    def tampered(trail, store, statement, by_address):
        honest(trail, store, statement, by_address)
        path = store.root / f"{statement.digest().hex()}.json"
        raw = json.loads(path.read_bytes())
        if edit == "loss":
            raw["ballots"][0]["loss_bits"][1] += 1
        elif edit == "drop":
            del raw["ballots"][0]
        else:
            raw["ballots"][0], raw["ballots"][1] = raw["ballots"][1], raw["ballots"][0]
        path.write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode())

    failures = run(tmp_path, tampered)
    assert len(failures) == 1
    assert failures[0].startswith("round 2: state statement") and "modified" in failures[0]


def test_verify_reports_a_statement_made_to_break_the_audit_instead_of_crashing(tmp_path):
    def unknowable(trail, store, statement, by_address):
        settings = dataclasses.replace(statement.settings, selection="no-such-rule")
        honest(trail, store, dataclasses.replace(statement, settings=settings), by_address)

    failures = run(tmp_path, unknowable)
    assert len(failures) == 1
    assert failures[0].startswith("round 2: its decision cannot be recomputed")


REJECTED = (0.5, 2.0, 2.0)
"""Losses of a round's three validators under which its candidate is voted down."""


@pytest.mark.parametrize(
    ("forge", "why"),
    [
        (lambda statement, domain: with_ballots(statement, domain, REJECTED), "rejected"),
        (
            # the operator passes two rejections off as accepts, signed with other keys
            lambda statement, domain: with_ballots(
                statement, domain, (0.5, 0.5, 0.5), [ACCOUNTS[0], ACCOUNTS[7], ACCOUNTS[7]]
            ),
            "forged ballots",
        ),
        (
            # accepts cast in another run (same chain and contract address, another run id)
            lambda statement, domain: with_ballots(
                statement, dataclasses.replace(domain, run=b"\x01" * 32), (0.5, 0.5, 0.5)
            ),
            "another run's ballots",
        ),
    ],
)
def test_verify_fails_when_the_chain_anchors_what_the_ballots_do_not_commit(tmp_path, forge, why):
    """The miners' keys are public in simulation: anyone can certify anything, so the
    ballots, not the certificate, say what the round decided."""

    def anchored_anyway(trail, store, statement, by_address):
        assert len(statement.validators) == 3
        honest(trail, store, forge(statement, trail.domain), by_address)

    failures = run(tmp_path, anchored_anyway)
    anchors = [f for f in failures if f.startswith("round 2: the chain anchors 0x")]
    assert len(anchors) == 1, why
    assert "the ballots do not: rollback: no candidate reached quorum" in anchors[0]
    # A ballot that does not check is stated as counting: tampering, named on its own.
    false_records = [f for f in failures if "'s ballot counts but does not check" in f]
    assert (
        len(false_records) == {"rejected": 0, "forged ballots": 3, "another run's ballots": 3}[why]
    )
    assert sorted(failures) == sorted(anchors + false_records)


def test_a_ballot_edited_after_the_round_fails_verify_even_where_the_rest_reach_quorum(tmp_path):
    """One ballot's loss edited and the round re-anchored with the public keys: the other
    ballots still commit the candidate, so only the ballot record shows the edit."""

    def edited(trail, store, statement, by_address):
        ballots = [dict(entry) for entry in statement.ballots]
        ballots[0]["loss_bits"] = [bits + 1 for bits in ballots[0]["loss_bits"]]
        edited_by.append(ballots[0]["validator"])
        honest(trail, store, dataclasses.replace(statement, ballots=tuple(ballots)), by_address)

    edited_by: list[str] = []
    failures = run(tmp_path, edited)
    assert len(failures) == 1
    assert failures[0].startswith(f"round 2: {edited_by[0]}'s ballot counts but does not check")


def test_a_ballot_rejected_when_the_round_ran_is_recorded_with_its_reason(tmp_path):
    def marked(trail, store, statement, by_address):
        forged = with_ballots(statement, trail.domain, (0.5, 0.5, 0.5), [ACCOUNTS[7]] * 3)
        honest(trail, store, record_ballot_faults(forged, trail.domain), by_address)

    # Recorded as rejected, the three forged ballots are abstentions, not false records:
    # what fails is only that the chain anchors a candidate they cannot commit.
    failures = run(tmp_path, marked)
    assert len(failures) == 1 and failures[0].startswith("round 2: the chain anchors 0x")


def test_a_valid_ballot_recorded_as_rejected_fails_verify(tmp_path):
    def hidden(trail, store, statement, by_address):
        ballots = [dict(entry) for entry in statement.ballots]
        ballots[0]["rejected"] = "made up"  # a valid vote passed off as an abstention
        honest(trail, store, dataclasses.replace(statement, ballots=tuple(ballots)), by_address)

    failures = run(tmp_path, hidden)
    assert any("'s ballot checks but is recorded as rejected (made up)" in f for f in failures)


def test_verify_fails_when_a_round_anchors_no_statement(tmp_path):
    def missing(trail, store, statement, by_address):
        honest(trail, store, statement, by_address)
        (store.root / f"{statement.digest().hex()}.json").unlink()

    failures = run(tmp_path, missing)
    assert len(failures) == 1 and "no document" in failures[0]


@pytest.mark.parametrize("name", ["../../etc/passwd", "models/" + "ab" * 32, "0xnothex"])
def test_replay_names_a_stated_model_that_is_not_a_hash_instead_of_crashing(tmp_path, name):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ReplayMismatchError, match=r"^w_t: not a model hash"):
        _load_model(store, name, ("w", "b"), "w_t")


def test_a_stored_model_or_statement_linked_to_a_pristine_copy_elsewhere_is_refused(tmp_path):
    store = ModelStore(tmp_path / "run" / "models")
    digest = store.save(toy_model(1.0))
    document = store.save_document(b'{"round": 1}')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (store.path(digest), store.root / f"{document.hex()}.json"):
        pristine = elsewhere / path.name
        pristine.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(pristine)  # the content still hashes right, from outside the run
    with pytest.raises(ModelIntegrityError, match="is a symbolic link"):
        store.load(digest)
    with pytest.raises(ModelIntegrityError, match="is a symbolic link"):
        store.load_document(document)


@pytest.mark.parametrize("splice", ["another run", "another round", "another update"])
def test_verify_fails_on_a_packet_spliced_in_from_elsewhere(tmp_path, splice):
    """verify checks every stated packet itself: replay needs the kept updates."""

    def spliced(trail, store, statement, by_address):
        first = statement.replies[0]
        domain = trail.domain
        round_number, update = statement.round, first.update_hash
        if splice == "another run":
            domain = dataclasses.replace(domain, run=b"\x07" * 32)
        elif splice == "another round":
            round_number = statement.round + 5
        else:
            update = "0x" + "ee" * 32
        packet = ModelPacket(bytes.fromhex(update[2:]), 1_700_000_000, round_number, first.identity)
        signed = packet.sign(by_address[first.identity], domain)
        reply = dataclasses.replace(first, packet=packet_fields(signed))
        statement = dataclasses.replace(statement, replies=(reply, *statement.replies[1:]))
        honest(trail, store, statement, by_address)

    failures = run(tmp_path, spliced)
    assert len(failures) == 1
    assert failures[0].startswith("round 2, reply 0 (node 100): its signed packet does not sign")


def test_verify_accepts_a_packet_that_signs_its_stated_update(tmp_path):
    def signed_reply(trail, store, statement, by_address):
        first = statement.replies[0]
        packet = ModelPacket(
            bytes.fromhex(first.update_hash[2:]), 1_700_000_000, statement.round, first.identity
        )
        reply = dataclasses.replace(
            first, packet=packet_fields(packet.sign(by_address[first.identity], trail.domain))
        )
        honest(
            trail,
            store,
            dataclasses.replace(statement, replies=(reply, *statement.replies[1:])),
            by_address,
        )

    assert run(tmp_path, signed_reply) == []
