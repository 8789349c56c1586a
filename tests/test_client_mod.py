"""The bcsfl client mod with real Flower Messages: signed train replies and committee duty."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
from eth_account import Account
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
    committee_root,
)
from bcsfl_flower.ballots import Ballot
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.client.mod import bcsfl_client_app, bcsfl_mod
from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
    ModelPacket,
    PacketVerifier,
    SignedModelPacket,
    accepted_root,
    model_hash,
)
from bcsfl_flower.protocol import (
    APPROVAL_RECORD_KEY,
    CANDIDATE_CONFIG_KEY,
    COMMITTEE_RECORD_KEY,
    DEVELOPMENT_KEYS_KEY,
    DUTY_MODEL_PREFIX,
    ROLLBACK_CANDIDATE,
    CommitteeDuty,
    duty_content,
    mine_request,
    read_duty_loss,
    read_duty_verdict,
    rollback_request,
    serves_duty,
    signing_config,
)
from bcsfl_flower.round.conclusion import stated_rollback_reason
from bcsfl_flower.round.statement import DecisionSettings, RoundStatement, StatedPlan, StatedReply

DOMAIN = Eip712Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", bytes(range(32)))
SIMULATED = {DEVELOPMENT_KEYS_KEY: True}
"""What a simulation's signing config adds: nodes may sign with development keys."""


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a run need the process's task identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def record(value: float) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.full((2, 2), value, dtype=np.float32)),
            "b": Array(np.zeros(2, dtype=np.float32)),
        }
    )


def context(partition_id: int = 0, **node_config) -> Context:
    return Context(
        run_id=1,
        node_id=partition_id + 100,
        node_config={"partition-id": partition_id, "num-partitions": 5, **node_config},
        state=RecordDict(),
        run_config={},
    )


def train_message(round_number: int = 3, *, signed: bool = True) -> Message:
    config = {"server-round": round_number, "lr": 0.1}
    if signed:
        config.update(signing_config(DOMAIN, development_keys=True))
    content = RecordDict({"arrays": record(0.0), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=100, message_type="train")


def fake_training(msg: Message, ctx: Context) -> Message:
    content = RecordDict({"arrays": record(1.0), "metrics": MetricRecord({"num-examples": 10})})
    return Message(content, reply_to=msg)


# --------------------------------------------------------------------------------------
# Train replies
# --------------------------------------------------------------------------------------


def test_train_reply_carries_a_packet_the_server_accepts():
    reply = bcsfl_mod(train_message(), context(2), fake_training)
    packet_record = reply.content[PACKET_RECORD_KEY]
    verifier = PacketVerifier(DOMAIN, [client_dev_account(2).address])
    accepted = verifier.verify(packet_record, reply.content["arrays"], server_round=3)
    assert accepted.packet.client == client_dev_account(2).address
    assert accepted.packet.model_hash == model_hash(record(1.0))
    assert abs(accepted.packet.timestamp - time.time()) < 60
    assert reply.content["metrics"]["num-examples"] == 10


def test_train_reply_stays_unsigned_without_an_audit_domain():
    reply = bcsfl_mod(train_message(signed=False), context(), fake_training)
    assert PACKET_RECORD_KEY not in reply.content
    assert model_hash(reply.content["arrays"]) == model_hash(record(1.0))
    # but it says that this node serves committee duties, chain or not
    assert serves_duty(reply.content)
    assert not serves_duty(fake_training(train_message(), context()).content)


class OneNodeGrid:
    def get_node_ids(self):
        return [100]


@pytest.mark.parametrize("configrecord_key", ["config", "train-settings"])
def test_train_config_under_any_record_name_is_signed(configrecord_key):
    """A strategy may send its config under another record (FedAvg's ``configrecord_key``)."""
    strategy = FedAvg(configrecord_key=configrecord_key, min_available_nodes=1, min_train_nodes=1)
    (message,) = strategy.configure_train(
        7, record(0.0), ConfigRecord(signing_config(DOMAIN, development_keys=True)), OneNodeGrid()
    )
    assert list(message.content.config_records) == [configrecord_key]
    reply = bcsfl_mod(message, context(2), fake_training)
    verifier = PacketVerifier(DOMAIN, [client_dev_account(2).address])
    accepted = verifier.verify(reply.content[PACKET_RECORD_KEY], reply.content["arrays"], 7)
    assert accepted.packet.round == 7


def reply_with(**records):
    def handler(msg, ctx):
        content = RecordDict({**records, "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    return handler


def signed_hash(reply: Message) -> bytes | None:
    if PACKET_RECORD_KEY not in reply.content:
        return None
    return SignedModelPacket.from_config_record(reply.content[PACKET_RECORD_KEY]).packet.model_hash


def test_train_reply_signing_needs_a_round_and_one_identifiable_model():
    without_round = train_message()
    del without_round.content["config"]["server-round"]
    assert signed_hash(bcsfl_mod(without_round, context(), fake_training)) is None
    # several models: the one named "arrays" is signed; with none so named, nothing is
    two = reply_with(arrays=record(1.0), extra=record(2.0))
    assert signed_hash(bcsfl_mod(train_message(), context(), two)) == model_hash(record(1.0))
    ambiguous = reply_with(first=record(1.0), second=record(2.0))
    assert signed_hash(bcsfl_mod(train_message(), context(), ambiguous)) is None
    # a single model under another name is signed
    renamed = reply_with(weights=record(3.0))
    assert signed_hash(bcsfl_mod(train_message(), context(), renamed)) == model_hash(record(3.0))


def test_error_replies_and_other_messages_pass_through():
    def failing(msg, ctx):
        return Message(Error(code=0, reason="boom"), reply_to=msg)

    reply = bcsfl_mod(train_message(), context(), failing)
    assert reply.has_error()
    evaluate = Message(
        RecordDict(
            {
                "arrays": record(0.0),
                "config": ConfigRecord(signing_config(DOMAIN, development_keys=True)),
            }
        ),
        dst_node_id=100,
        message_type="evaluate",
    )
    answered = bcsfl_mod(evaluate, context(), fake_training)
    assert PACKET_RECORD_KEY not in answered.content


def test_keystore_in_node_config_wins_over_the_dev_key(tmp_path):
    account = Account.create()
    keystore = tmp_path / "node.json"
    keystore.write_text(json.dumps(Account.encrypt(account.key, "pw", iterations=2)))
    secret = tmp_path / "pw.txt"
    secret.write_text("pw\n")
    ctx = context(
        0, **{"bcsfl-keystore": str(keystore), "bcsfl-keystore-password-file": str(secret)}
    )
    reply = bcsfl_mod(train_message(), ctx, fake_training)
    packet = SignedModelPacket.from_config_record(reply.content[PACKET_RECORD_KEY])
    assert packet.packet.client == account.address
    assert packet.recover(DOMAIN) == account.address


# --------------------------------------------------------------------------------------
# Miner duty
# --------------------------------------------------------------------------------------

MINERS = [client_dev_account(i) for i in range(3)]


def packets_for(round_number: int) -> list[SignedModelPacket]:
    signed = []
    for index in (3, 4):
        account = client_dev_account(index)
        packet = ModelPacket(
            model_hash(record(float(index))), int(time.time()), round_number, account.address
        )
        signed.append(packet.sign(account, DOMAIN))
    return signed


PREVIOUS = model_hash(record(0.0))
VALIDATOR = client_dev_account(5)


def round_statement(
    value: float = 1.0,
    *,
    loss: float = 0.5,
    signer=VALIDATOR,
    round_number: int = 3,
    domain: Eip712Domain = DOMAIN,
) -> RoundStatement:
    """Round 3's statement: one validator whose ballot scores ``record(value)`` at ``loss``
    against 1.0 for ``w_t``, so the candidate commits unless ``loss`` exceeds 1.0."""
    candidate = model_hash(record(value))
    ballot = Ballot(round_number, signer.address, PREVIOUS, (PREVIOUS, candidate), (1.0, loss))
    identity = VALIDATOR.address
    return RoundStatement(
        round=round_number,
        previous_hash="0x" + PREVIOUS.hex(),
        settings=DecisionSettings(1, 3, 0.0, 3.0, 0.0, 1.0, "trusted-mean", "plain"),
        stakes={identity: 1.0},
        replies=(StatedReply("105", identity, 1.0, "0x" + candidate.hex()),),
        candidates=(identity,),
        validators=(identity,),
        plan=StatedPlan(
            names=("trusted-mean",),
            scored={"trusted-mean": "0x" + candidate.hex()},
            supports=((0,),),
        ),
        ballots=(ballot.sign(signer, domain).to_fields(),),
    )


STATEMENT = round_statement()


def approval(round_number: int = 3, value: float = 1.0, packets=()) -> RoundApproval:
    return RoundApproval(
        round=round_number,
        model_hash=model_hash(record(value)),
        previous_hash=PREVIOUS,
        accepted_root=accepted_root(packets, DOMAIN),
        committee_root=committee_root([m.address for m in MINERS]),
        state_root=STATEMENT.digest(),
        timestamp=int(time.time()),
    )


def duty(
    statement: RoundApproval,
    arrays: ArrayRecord,
    packets=(),
    miners=MINERS,
    document: bytes | None = STATEMENT.to_bytes(),
) -> Message:
    """A committee duty that asks one miner to approve candidate ``c`` (and to evaluate none)."""
    request = mine_request(
        statement, DOMAIN, [m.address for m in miners], arrays, packets, document
    )
    content = duty_content(CommitteeDuty({}, {"server-round": 3, **SIMULATED}, {"c": request}))
    return Message(content, dst_node_id=100, message_type="evaluate")


def read_verdict(reply: Message):
    return read_duty_verdict(reply, "c")


def must_not_run(msg, ctx):
    raise AssertionError("a duty with nothing to evaluate must not reach the app")


def test_miner_approves_a_valid_package_with_a_recoverable_signature():
    packets = packets_for(3)
    statement = approval(packets=packets)
    reply = bcsfl_mod(duty(statement, record(1.0), packets), context(1), must_not_run)
    verdict = read_verdict(reply)
    assert verdict.approved, verdict.reason
    assert verdict.signer == MINERS[1].address
    assert statement.recover(verdict.signature, DOMAIN) == MINERS[1].address


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered-arrays", "hash to"),
        ("not-a-member", "not in the round's committee"),
        ("stale", "old"),
        ("wrong-committee-root", "committee root"),
        ("bad-packet", "signed by"),
        ("packet-root", "accepted root"),
    ],
)
def test_miner_refuses_a_bad_package(case, reason):
    packets = packets_for(3)
    statement = approval(packets=packets)
    arrays, ctx, sent_packets = record(1.0), context(1), packets
    if case == "tampered-arrays":
        arrays = record(1.5)
    elif case == "not-a-member":
        ctx = context(4)
    elif case == "stale":
        statement = dataclasses.replace(statement, timestamp=int(time.time()) - 3600)
    elif case == "wrong-committee-root":
        statement = dataclasses.replace(statement, committee_root=b"\x01" * 32)
    elif case == "bad-packet":
        forged = SignedModelPacket(
            dataclasses.replace(packets[0].packet, client=client_dev_account(4).address),
            packets[0].signature,
        )
        sent_packets = [forged, packets[1]]
    elif case == "packet-root":
        sent_packets = packets[:1]
    reply = bcsfl_mod(duty(statement, arrays, sent_packets), ctx, must_not_run)
    verdict = read_verdict(reply)
    assert not verdict.approved
    assert reason in verdict.reason


@pytest.mark.parametrize("member", [True, False])
def test_a_miner_signs_the_rounds_rollback_only_as_a_committee_member(member):
    nothing = round_statement(loss=2.0)  # the candidate raises the only validator's loss
    root = committee_root([m.address for m in MINERS])
    reason = stated_rollback_reason(nothing, DOMAIN)
    rollback = RoundRollback(3, PREVIOUS, root, nothing.digest(), reason)
    committee = [m.address for m in MINERS]
    request = rollback_request(rollback, DOMAIN, committee, nothing.to_bytes())
    content = duty_content(
        CommitteeDuty({}, {"server-round": 3, **SIMULATED}, {ROLLBACK_CANDIDATE: request})
    )
    message = Message(content, dst_node_id=100, message_type="evaluate")
    reply = bcsfl_mod(message, context(1 if member else 4), must_not_run)
    verdict = read_duty_verdict(reply, ROLLBACK_CANDIDATE)
    if member:
        assert verdict.approved, verdict.reason
        assert rollback.recover(verdict.signature, DOMAIN) == MINERS[1].address
    else:
        assert not verdict.approved and "not in the round's committee" in verdict.reason


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        (round_statement(loss=2.0), "commit no candidate"),
        # a ballot that does not check, stated as counting: garbled in flight, or forged
        (round_statement(signer=MINERS[0]), "record of its ballots is false"),
        (round_statement(value=1.5), "not the model asked"),
        (round_statement(round_number=4), "round 4's"),
        (None, "no statement"),
    ],
)
def test_a_miner_signs_only_what_the_ballots_decide(statement, reason):
    """The miner recomputes the decision from the statement it signs, with the round's own
    function: the operator cannot have it certify a candidate the validators rejected.

    Where it could read the statement, it signs the round's rollback instead, so that a
    quorum of refusals certifies the rollback as the miners' word; over a statement it
    could not read, it signs nothing."""
    request = approval()
    if statement is not None:
        request = dataclasses.replace(request, state_root=statement.digest())
    document = None if statement is None else statement.to_bytes()
    verdict = read_verdict(
        bcsfl_mod(duty(request, record(1.0), document=document), context(1), must_not_run)
    )
    assert not verdict.approved
    assert reason in verdict.reason
    readable = statement is not None and statement.round == request.round
    if readable:
        assert request.refusal().recover(verdict.refusal, DOMAIN) == MINERS[1].address
    else:
        assert verdict.refusal is None
    # a statement other than the one whose hash it signs is refused as well, unsigned
    tampered = duty(approval(), record(1.0), document=round_statement(loss=0.4).to_bytes())
    verdict = read_verdict(bcsfl_mod(tampered, context(1), must_not_run))
    assert not verdict.approved and "does not hash to the state root" in verdict.reason
    assert verdict.refusal is None


@pytest.mark.parametrize("committed", [True, False])
def test_a_miner_refuses_a_rollback_of_a_round_the_ballots_commit(committed):
    statement = round_statement(loss=0.5 if committed else 2.0)
    root = committee_root([m.address for m in MINERS])
    rollback = RoundRollback(
        3, PREVIOUS, root, statement.digest(), stated_rollback_reason(statement, DOMAIN)
    )
    verdict = rollback_verdict(rollback, statement)
    assert verdict.approved is not committed
    if committed:
        assert "the ballots commit trusted-mean" in verdict.reason
    else:  # the reason is signed: a miner signs only the one the ballots give
        edited = dataclasses.replace(rollback, reason="the validators were attackers")
        verdict = rollback_verdict(edited, statement)
        assert not verdict.approved and "the rollback's reason is" in verdict.reason


def rollback_verdict(rollback, statement):
    request = rollback_request(rollback, DOMAIN, [m.address for m in MINERS], statement.to_bytes())
    content = duty_content(
        CommitteeDuty({}, {"server-round": 3, **SIMULATED}, {ROLLBACK_CANDIDATE: request})
    )
    reply = bcsfl_mod(
        Message(content, dst_node_id=100, message_type="evaluate"), context(1), must_not_run
    )
    return read_duty_verdict(reply, ROLLBACK_CANDIDATE)


def test_malformed_duty_is_refused_not_raised():
    message = duty(approval(), record(1.0))
    message.content[f"{APPROVAL_RECORD_KEY}.c"] = ConfigRecord({"round": 1})
    verdict = read_verdict(bcsfl_mod(message, context(), must_not_run))
    assert not verdict.approved and "malformed" in verdict.reason
    # a duty that names a model it does not carry is refused as a whole, with an error
    message = duty(approval(), record(1.0))
    del message.content[DUTY_MODEL_PREFIX + "c"]
    reply = bcsfl_mod(message, context(), must_not_run)
    assert reply.has_error() and "does not carry it" in reply.error.reason


@pytest.mark.parametrize(
    ("record_key", "field", "value", "reason"),
    [
        (APPROVAL_RECORD_KEY, "chain-id", float("inf"), "chain_id must be an int"),
        (APPROVAL_RECORD_KEY, "chain-id", "31337", "chain_id must be an int"),
        (APPROVAL_RECORD_KEY, "contract", "not-an-address", "verifying_contract"),
        (COMMITTEE_RECORD_KEY, "miners", MINERS[1].address, "must be a list"),
    ],
)
def test_duty_fields_of_the_wrong_type_are_refused_not_raised(record_key, field, value, reason):
    message = duty(approval(), record(1.0))
    message.content[f"{record_key}.c"][field] = value
    verdict = read_verdict(bcsfl_mod(message, context(1), must_not_run))
    assert not verdict.approved
    assert verdict.signer == MINERS[1].address
    assert "malformed" in verdict.reason and reason in verdict.reason


def test_duty_without_a_committee_is_refused():
    without_committee = duty(approval(), record(1.0))
    del without_committee.content[f"{COMMITTEE_RECORD_KEY}.c"]
    verdict = read_verdict(bcsfl_mod(without_committee, context(1), must_not_run))
    assert not verdict.approved and "names no committee" in verdict.reason


def test_client_app_routes_train_and_the_committee_duty_through_the_mod():
    app = bcsfl_client_app()
    app.train()(fake_training)
    app.evaluate()(must_not_run)
    reply = app(train_message(), context(0))
    assert PACKET_RECORD_KEY in reply.content
    statement = approval()
    verdict = read_verdict(app(duty(statement, record(1.0)), context(0)))
    assert verdict.approved and statement.recover(verdict.signature, DOMAIN) == MINERS[0].address


def test_node_without_a_key_answers_the_duty_with_an_error():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = bcsfl_mod(duty(approval(), record(1.0)), ctx, must_not_run)
    assert reply.has_error()
    verdict = read_verdict(reply)
    assert not verdict.approved and "no key" in verdict.reason


def test_outside_simulation_a_node_without_a_keystore_refuses_the_development_key(caplog):
    """A deployment's trail does not admit development keys: a node with a partition id
    but no keystore neither signs its train reply nor mines, and says what to set."""
    train = train_message()
    train.content["config"].pop(DEVELOPMENT_KEYS_KEY)
    reply = bcsfl_mod(train, context(2), fake_training)
    assert PACKET_RECORD_KEY not in reply.content  # unsigned: the server rejects it
    assert "set bcsfl-keystore" in caplog.text
    request = mine_request(approval(), DOMAIN, [m.address for m in MINERS], record(1.0))
    content = duty_content(CommitteeDuty({}, {"server-round": 3}, {"c": request}))
    mined = bcsfl_mod(
        Message(content, dst_node_id=100, message_type="evaluate"), context(1), must_not_run
    )
    verdict = read_verdict(mined)
    assert not verdict.approved
    assert "PUBLIC development keys" in verdict.reason and "bcsfl-keystore" in verdict.reason


def test_miner_approvals_from_the_mod_anchor_on_chain(tmp_path):
    from bcsfl_flower.chain.audit import AuditTrail
    from bcsfl_flower.chain.backends import connect
    from bcsfl_flower.chain.certificates import AnchorCertificate

    with connect("embedded", tmp_path) as connection:
        trail = AuditTrail.open(connection, model_hash(record(0.0)))
        trail.register_clients({m.address: 1 for m in MINERS})
        # clients 3 and 4 trained; their signed replies are the accepted packets
        packets = []
        verifier = PacketVerifier(trail.domain, [client_dev_account(i).address for i in (3, 4)])
        for partition in (3, 4):
            message = train_message(1, signed=False)
            message.content["config"].update(signing_config(trail.domain, development_keys=True))
            reply = bcsfl_mod(message, context(partition), fake_training)
            packets.append(
                verifier.verify(reply.content[PACKET_RECORD_KEY], reply.content["arrays"], 1)
            )
        committee = [m.address for m in MINERS]
        stated = round_statement(round_number=1, domain=trail.domain)
        statement = trail.prepare_approval(
            1,
            model_hash(record(1.0)),
            accepted_root(packets, trail.domain),
            committee,
            stated.digest(),
        )
        verdicts = [
            read_verdict(
                bcsfl_mod(
                    Message(
                        duty_content(
                            CommitteeDuty(
                                {},
                                SIMULATED,
                                {
                                    "c": mine_request(
                                        statement,
                                        trail.domain,
                                        committee,
                                        record(1.0),
                                        packets,
                                        stated.to_bytes(),
                                    )
                                },
                            )
                        ),
                        dst_node_id=100 + i,
                        message_type="evaluate",
                    ),
                    context(i),
                    must_not_run,
                )
            )
            for i in range(3)
        ]
        signatures = {v.signer: v.signature for v in verdicts if v.approved}
        assert len(signatures) == 3
        anchored = trail.anchor_round(
            AnchorCertificate.build(statement, committee, signatures, trail.domain)
        )
        assert anchored.approval.accepted_root == accepted_root(packets, trail.domain)
        assert trail.head() == (1, model_hash(record(1.0)))


# --------------------------------------------------------------------------------------
# Committee duty: validation through the app's own evaluate handler
# --------------------------------------------------------------------------------------


def loss_of_w(msg: Message, ctx: Context) -> Message:
    """An ordinary evaluate handler: the loss is the model's first weight."""
    loss = float(msg.content["arrays"]["w"].numpy().flat[0])
    if loss < 0:
        raise RuntimeError("cannot evaluate a negative model")
    if loss > 100:
        return Message(Error(code=1, reason="model too large"), reply_to=msg)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": 4})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def validation_duty(**models: ArrayRecord) -> Message:
    content = duty_content(CommitteeDuty(models, {"server-round": 3, **SIMULATED}, {}))
    return Message(content, dst_node_id=100, message_type="evaluate")


def test_a_validator_duty_runs_the_evaluate_handler_once_per_model():
    seen = []

    def handler(msg, ctx):
        seen.append(dict(msg.content["config"]))
        return loss_of_w(msg, ctx)

    models = {"w_t": record(2.0), "mean": record(0.5), "median": record(0.75)}
    reply = bcsfl_mod(validation_duty(**models), context(1), handler)
    assert not reply.has_error()
    assert [read_duty_loss(reply, name, "eval_loss") for name in models] == [
        (2.0, None),
        (0.5, None),
        (0.75, None),
    ]
    # each model reached the handler as the ordinary evaluate message a plain validator gets
    assert seen == [{"server-round": 3, **SIMULATED, CANDIDATE_CONFIG_KEY: name} for name in models]


def test_a_model_the_handler_fails_on_is_reported_by_name_and_the_rest_still_count():
    models = {"w_t": record(2.0), "raises": record(-1.0), "errors": record(500.0)}
    reply = bcsfl_mod(validation_duty(**models), context(1), loss_of_w)
    assert read_duty_loss(reply, "w_t", "eval_loss") == (2.0, None)
    loss, problem = read_duty_loss(reply, "raises", "eval_loss")
    assert np.isnan(loss) and "RuntimeError: cannot evaluate a negative model" in problem
    loss, problem = read_duty_loss(reply, "errors", "eval_loss")
    assert np.isnan(loss) and "model too large" in problem


def test_a_validator_duty_needs_no_key_but_a_miner_duty_does():
    keyless = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = bcsfl_mod(validation_duty(w_t=record(1.0)), keyless, loss_of_w)
    assert read_duty_loss(reply, "w_t", "eval_loss") == (1.0, None)
    refused = bcsfl_mod(duty(approval(), record(1.0)), keyless, must_not_run)
    assert refused.has_error() and "no key" in refused.error.reason


def test_a_miner_checks_the_request_against_the_chain_it_reads_itself(tmp_path):
    """With ``bcsfl-chain-url`` and ``bcsfl-contract`` in its node config, a miner takes
    the domain and the head from its own read of the chain, not from the request."""
    from chain_fixtures import http_connection, running_anvil

    from bcsfl_flower.chain.audit import AuditTrail

    with running_anvil() as url:
        connection = http_connection(url, tmp_path / "chain")
        trail = AuditTrail.open(connection, PREVIOUS)
        other = AuditTrail.deploy(connection, PREVIOUS)  # another run on the same chain
        own = {"bcsfl-chain-url": url, "bcsfl-contract": trail.address}
        committee = [m.address for m in MINERS]
        stated = round_statement(round_number=1, domain=trail.domain)

        def verdict(domain, previous=PREVIOUS, round_number=1, node_config=own):
            signed = RoundApproval(
                round_number,
                model_hash(record(1.0)),
                previous,
                accepted_root([], domain),
                committee_root(committee),
                stated.digest(),
                int(time.time()),
            )
            request = mine_request(signed, domain, committee, record(1.0), (), stated.to_bytes())
            message = Message(
                duty_content(CommitteeDuty({}, SIMULATED, {"c": request})),
                dst_node_id=101,
                message_type="evaluate",
            )
            return read_verdict(bcsfl_mod(message, context(1, **node_config), must_not_run))

        assert verdict(trail.domain).approved
        refused = verdict(other.domain)
        assert not refused.approved and f"contract {other.address}" in refused.reason
        forked = verdict(trail.domain, previous=b"\x09" * 32)
        assert not forked.approved and "is not the chain head this node reads" in forked.reason
        ahead = verdict(trail.domain, round_number=2)
        assert not ahead.approved and "at round 1, not 2" in ahead.reason
        unreadable = {"bcsfl-chain-url": "http://127.0.0.1:9", "bcsfl-contract": trail.address}
        blind = verdict(trail.domain, node_config=unreadable)
        assert not blind.approved and "cannot read the chain" in blind.reason
