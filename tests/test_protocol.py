"""bcsfl_flower.protocol: its builders round-trip, its readers survive malformed replies."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from eth_utils import to_checksum_address
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from bcsfl_flower.approvals import (
    RoundApproval,
    committee_root,
)
from bcsfl_flower.chain.keys import client_dev_account
from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
    ModelPacket,
    SignedModelPacket,
    accepted_root,
    model_hash,
)
from bcsfl_flower.protocol import (  # the committee duty
    APPROVAL_RECORD_KEY,
    BASELINE_CANDIDATE,
    CANDIDATE_CONFIG_KEY,
    CHAIN_ID_KEY,
    CKKS_CONFIG_KEY,
    COMMITTEE_RECORD_KEY,
    CONTRACT_KEY,
    DUTY_RECORD_KEY,
    GRAM_DIGEST_RECORD_KEY,
    GRAM_MESSAGE_TYPE,
    GRAM_RECORD_KEY,
    GRAM_REQUEST_RECORD_KEY,
    PACKETS_RECORD_KEY,
    PUBLIC_MESSAGE_TYPE,
    PUBLIC_RECORD_KEY,
    ROUND_KEY,
    RUN_KEY,
    VERDICT_RECORD_KEY,
    CommitteeDuty,
    config_value,
    duty_content,
    duty_reply_content,
    gram_digest,
    gram_reply_content,
    gram_request,
    mine_request,
    model_record,
    packet_record,
    public_context_content,
    read_duty,
    read_duty_loss,
    read_duty_verdict,
    read_gram_reply,
    read_gram_request,
    read_loss,
    read_mine_request,
    read_public_context,
    signing_config,
    signing_domain,
    validation_requests,
    verdict_content,
)

DOMAIN = Eip712Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", bytes(range(32)))
MINERS = [client_dev_account(i).address for i in range(3)]


def arrays(value: float = 1.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})


def request(message_type: str = GRAM_MESSAGE_TYPE) -> Message:
    return Message(RecordDict(), dst_node_id=5, message_type=message_type)


def answer(content: RecordDict, message_type: str = GRAM_MESSAGE_TYPE) -> Message:
    return Message(content, reply_to=request(message_type))


def error_answer(message_type: str = GRAM_MESSAGE_TYPE) -> Message:
    return Message(Error(code=1, reason="node crashed"), reply_to=request(message_type))


def raw_array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


# --------------------------------------------------------------------------------------
# Config lookup and the signing domain
# --------------------------------------------------------------------------------------


def test_config_value_finds_a_key_in_any_config_record():
    content = RecordDict(
        {
            "arrays": arrays(),
            "fit-settings": ConfigRecord({ROUND_KEY: 4, CKKS_CONFIG_KEY: True}),
            "metrics": MetricRecord({"lr": 0.1}),
        }
    )
    assert config_value(content, ROUND_KEY) == 4
    assert config_value(content, CKKS_CONFIG_KEY) is True
    assert config_value(content, "lr") is None  # metric records are not config
    assert config_value(RecordDict(), ROUND_KEY) is None


def test_config_value_takes_the_first_record_that_holds_the_key():
    content = RecordDict(
        {
            "a": ConfigRecord({"other": 1}),
            "b": ConfigRecord({ROUND_KEY: 2}),
            "c": ConfigRecord({ROUND_KEY: 3}),
        }
    )
    assert config_value(content, ROUND_KEY) == 2


def test_signing_domain_round_trips_under_any_record_name():
    content = RecordDict({"train-settings": ConfigRecord(signing_config(DOMAIN))})
    assert signing_domain(content) == DOMAIN
    assert signing_config(DOMAIN) == {
        CHAIN_ID_KEY: 31337,
        CONTRACT_KEY: "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        RUN_KEY: bytes(range(32)),
    }
    only_chain = RecordDict({"config": ConfigRecord({CHAIN_ID_KEY: 31337})})
    assert signing_domain(only_chain) is None
    assert signing_domain(RecordDict({"config": ConfigRecord({ROUND_KEY: 1})})) is None


def test_packet_record_and_model_record():
    content = RecordDict({"arrays": arrays(1.0), "extra": arrays(2.0)})
    assert packet_record(content) is None
    content[PACKET_RECORD_KEY] = ConfigRecord({"client": "x"})
    assert packet_record(content)["client"] == "x"

    name, record = model_record(content)
    assert name == "arrays" and model_hash(record) == model_hash(arrays(1.0))
    assert model_record(content, preferred="extra")[0] == "extra"
    assert model_record(RecordDict({"weights": arrays(3.0)}))[0] == "weights"
    with pytest.raises(ValueError, match="2 ArrayRecords and none named 'arrays'"):
        model_record(RecordDict({"a": arrays(), "b": arrays()}))
    with pytest.raises(ValueError, match="0 ArrayRecords"):
        model_record(RecordDict({"config": ConfigRecord({})}))


# --------------------------------------------------------------------------------------
# Validation requests and losses
# --------------------------------------------------------------------------------------


def test_validation_requests_ask_every_validator_about_every_model():
    models = {BASELINE_CANDIDATE: arrays(0.0), "trusted-mean": arrays(1.0)}
    requests = validation_requests(
        ["7", "9"],
        models,
        3,
        arrayrecord_key="weights",
        configrecord_key="evaluate-settings",
        extra_config={CKKS_CONFIG_KEY: True},
    )
    assert [(r.validator, r.candidate) for r in requests] == [
        ("7", BASELINE_CANDIDATE),
        ("7", "trusted-mean"),
        ("9", BASELINE_CANDIDATE),
        ("9", "trusted-mean"),
    ]
    for r in requests:
        message = r.message
        assert message.metadata.message_type == MessageType.EVALUATE
        assert message.metadata.dst_node_id == int(r.validator)
        assert list(message.content.array_records) == ["weights"]
        assert model_hash(message.content["weights"]) == model_hash(models[r.candidate])
        config = message.content["evaluate-settings"]
        assert config[ROUND_KEY] == 3 and config[CKKS_CONFIG_KEY] is True
        assert config[CANDIDATE_CONFIG_KEY] == r.candidate
    assert validation_requests([], models, 3) == []


def loss_reply(**metrics) -> Message:
    return answer(RecordDict({"metrics": MetricRecord(metrics)}), MessageType.EVALUATE)


@pytest.mark.parametrize(
    ("reply", "loss", "problem"),
    [
        (lambda: loss_reply(eval_loss=0.25), 0.25, None),
        (lambda: loss_reply(eval_loss=2), 2.0, None),
        (lambda: error_answer(MessageType.EVALUATE), math.nan, "error reply: node crashed"),
        (lambda: loss_reply(accuracy=0.9), math.nan, "metric 'eval_loss' missing"),
        (lambda: answer(RecordDict(), MessageType.EVALUATE), math.nan, "missing"),
        (lambda: loss_reply(eval_loss=[0.1, 0.2]), math.nan, "is not a number"),
        (lambda: loss_reply(eval_loss=float("nan")), math.nan, "is not finite"),
        (lambda: loss_reply(eval_loss=float("-inf")), math.nan, "is not finite"),
    ],
)
def test_read_loss(reply, loss, problem):
    value, reason = read_loss(reply(), "eval_loss")
    if problem is None:
        assert value == loss and reason is None
    else:
        assert math.isnan(value) and problem in reason


def test_read_loss_reads_any_metric_record():
    two = RecordDict(
        {"first": MetricRecord({"acc": 0.5}), "second": MetricRecord({"eval_loss": 0.75})}
    )
    assert read_loss(answer(two, MessageType.EVALUATE), "eval_loss") == (0.75, None)


# --------------------------------------------------------------------------------------
# Mining: the duty request and the verdict
# --------------------------------------------------------------------------------------


def signed_packets(server_round: int = 2) -> list[SignedModelPacket]:
    packets = []
    for partition in (3, 4):
        account = client_dev_account(partition)
        packet = ModelPacket(
            model_hash(arrays(partition)), int(time.time()), server_round, account.address
        )
        packets.append(packet.sign(account, DOMAIN))
    return packets


def approval(packets=()) -> RoundApproval:
    return RoundApproval(
        round=2,
        model_hash=model_hash(arrays()),
        previous_hash=b"\x01" * 32,
        accepted_root=accepted_root(list(packets), DOMAIN),
        committee_root=committee_root(MINERS),
        state_root=b"\x05" * 32,
        timestamp=int(time.time()),
    )


def test_mine_request_round_trips():
    packets = signed_packets()
    statement = approval(packets)
    parsed = read_mine_request(mine_request(statement, DOMAIN, MINERS, arrays(), packets))
    assert parsed.approval == statement
    assert parsed.domain == DOMAIN
    assert parsed.miners == tuple(MINERS)
    assert model_hash(parsed.arrays) == model_hash(arrays())
    assert parsed.packets == tuple(packets)


def test_mine_request_without_packets_or_committee():
    content = mine_request(approval(), DOMAIN, MINERS, arrays())
    assert PACKETS_RECORD_KEY not in content
    assert read_mine_request(content).packets is None
    del content[COMMITTEE_RECORD_KEY]
    del content["arrays"]
    parsed = read_mine_request(content)
    assert parsed.miners is None and parsed.arrays is None


def mangled(change) -> RecordDict:
    packets = signed_packets()
    content = mine_request(approval(packets), DOMAIN, MINERS, arrays(), packets)
    change(content)
    return content


def set_field(record_key, field, value):
    def change(content):
        content[record_key][field] = value

    return change


def drop(record_key, field=None):
    def change(content):
        if field is None:
            del content[record_key]
        else:
            del content[record_key][field]

    return change


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (drop(APPROVAL_RECORD_KEY), ValueError, "no 'bcsfl.approval' or 'bcsfl.rollback'"),
        (drop(APPROVAL_RECORD_KEY, "model-hash"), ValueError, "lacks field 'model-hash'"),
        (set_field(APPROVAL_RECORD_KEY, "round", "2"), ValueError, "'round' must be int"),
        (drop(APPROVAL_RECORD_KEY, "chain-id"), KeyError, "chain-id"),
        (set_field(APPROVAL_RECORD_KEY, "chain-id", float("inf")), TypeError, "chain_id"),
        (set_field(APPROVAL_RECORD_KEY, "chain-id", True), TypeError, "chain_id"),
        (set_field(APPROVAL_RECORD_KEY, "contract", b"\x00" * 20), ValueError, "contract"),
        (set_field(APPROVAL_RECORD_KEY, "run", b"\x00" * 20), ValueError, "run must be 32"),
        (drop(APPROVAL_RECORD_KEY, "run"), KeyError, "run"),
        (set_field(COMMITTEE_RECORD_KEY, "miners", MINERS[0]), TypeError, "list of addresses"),
        (
            set_field(PACKETS_RECORD_KEY, "timestamp", [int(time.time())]),
            ValueError,
            "different lengths",
        ),
        (
            set_field(PACKETS_RECORD_KEY, "signature", [b"\x00" * 65] * 3),
            ValueError,
            "different lengths",
        ),
        (drop(PACKETS_RECORD_KEY, "client"), KeyError, "client"),
        (set_field(PACKETS_RECORD_KEY, "round", 2), TypeError, "int"),
        (set_field(PACKETS_RECORD_KEY, "model-hash", [b"\x00" * 5] * 2), ValueError, "32 bytes"),
        (set_field(PACKETS_RECORD_KEY, "signature", [b"\x00"] * 2), ValueError, "65 bytes"),
    ],
)
def test_read_mine_request_raises_only_the_documented_errors(change, error, match):
    with pytest.raises(error, match=match):
        read_mine_request(mangled(change))


def read_verdict(reply: Message):
    return read_duty_verdict(reply, "c")


def verdict_answer(verdict: RecordDict) -> Message:
    return answer(duty_reply_content({}, {"c": verdict}, {}), "evaluate")


def test_verdict_round_trips():
    signer = client_dev_account(1)
    signature = approval().sign(signer, DOMAIN)
    approved = read_verdict(verdict_answer(verdict_content(signer.address, signature=signature)))
    assert approved.approved
    assert (approved.signer, approved.signature, approved.reason) == (
        signer.address,
        signature,
        None,
    )
    refused = read_verdict(verdict_answer(verdict_content(signer.address, reason="too old")))
    assert not refused.approved
    assert (refused.signer, refused.reason) == (signer.address, "too old")


def verdict_reply(**fields) -> Message:
    return answer(RecordDict({f"{VERDICT_RECORD_KEY}.c": ConfigRecord(fields)}), "evaluate")


def test_read_verdict_turns_malformed_replies_into_refusals():
    address = client_dev_account(1).address
    signature = b"\x01" * 65
    error = read_verdict(error_answer("evaluate"))
    assert (error.signer, error.signature) == (None, None) and "node crashed" in error.reason
    empty = read_verdict(answer(RecordDict({"other": ConfigRecord({})}), "evaluate"))
    assert not empty.approved and "no verdict on 'c'" in empty.reason
    # approval claims that do not hold up
    cases = {
        "no signer": verdict_reply(approved=True, signature=signature),
        "signer not an address": verdict_reply(approved=True, signer="me", signature=signature),
        "signature not bytes": verdict_reply(approved=True, signer=address, signature="0x01"),
        "no signature": verdict_reply(approved=True, signer=address),
        "approved not True": verdict_reply(approved="yes", signer=address, signature=signature),
        "approved 1": verdict_reply(approved=1, signer=address, signature=signature),
    }
    for name, reply in cases.items():
        verdict = read_verdict(reply)
        assert not verdict.approved and verdict.signature is None, name
        assert verdict.reason == "not approved", name
    lower = read_verdict(verdict_reply(approved=True, signer=address.lower(), signature=signature))
    assert lower.approved and lower.signer == to_checksum_address(address)


# --------------------------------------------------------------------------------------
# Committee duty
# --------------------------------------------------------------------------------------


def test_committee_duty_round_trips_and_carries_each_model_once():
    packets = signed_packets()
    request = mine_request(approval(packets), DOMAIN, MINERS, arrays(2.0), packets)
    sent = CommitteeDuty(
        {"w_t": arrays(1.0), "mean": arrays(2.0)},
        {ROUND_KEY: 4},
        {"mean": request},
        arrayrecord_key="weights",
        configrecord_key="settings",
    )
    content = duty_content(sent)
    assert len(content.array_records) == 2  # the mined candidate travels once
    parsed = read_duty(content)
    assert list(parsed.models) == ["w_t", "mean"]
    assert dict(parsed.config) == {ROUND_KEY: 4}
    assert (parsed.arrayrecord_key, parsed.configrecord_key) == ("weights", "settings")
    mined = read_mine_request(parsed.mining["mean"])
    assert mined.approval == approval(packets)
    assert model_hash(mined.arrays) == model_hash(arrays(2.0))
    assert mined.packets == tuple(packets)
    assert read_duty(RecordDict({"config": ConfigRecord({ROUND_KEY: 1})})) is None


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("models", "w_t", "list of names"),
        ("models", [1, 2], "list of names"),
        ("mine", 3.5, "list of names"),
        ("arrayrecord-key", "", "record name"),
        ("configrecord-key", 7, "record name"),
        ("models", ["w_t", "ghost"], "does not carry it"),
    ],
)
def test_a_malformed_duty_raises_value_error_naming_the_field(field, value, match):
    content = duty_content(CommitteeDuty({"w_t": arrays()}, {}, {}))
    content[DUTY_RECORD_KEY][field] = value
    with pytest.raises(ValueError, match=match):
        read_duty(content)


def test_duty_losses_are_read_per_model_and_never_raise():
    reply = answer(
        duty_reply_content(
            {
                "w_t": RecordDict({"m": MetricRecord({"eval_loss": 0.5})}),
                "nan": RecordDict({"m": MetricRecord({"eval_loss": float("nan")})}),
            },
            {},
            {"broken": "RuntimeError: boom"},
        ),
        "evaluate",
    )
    assert read_duty_loss(reply, "w_t", "eval_loss") == (0.5, None)
    for name, reason in [("nan", "not finite"), ("broken", "boom"), ("absent", "no metrics")]:
        loss, problem = read_duty_loss(reply, name, "eval_loss")
        assert math.isnan(loss) and reason in problem, name
    loss, problem = read_duty_loss(error_answer("evaluate"), "w_t", "eval_loss")
    assert math.isnan(loss) and "node crashed" in problem


# --------------------------------------------------------------------------------------
# CKKS: the Gram query, its reply and the public context
# --------------------------------------------------------------------------------------


def test_gram_request_round_trips_and_checks_its_arguments():
    content = gram_request(b"packed gram", 7)
    assert read_gram_request(content) == (b"packed gram", 7)
    with pytest.raises(TypeError, match="bytes"):
        gram_request("packed gram", 7)
    with pytest.raises(TypeError, match="int"):
        gram_request(b"packed gram", True)
    with pytest.raises(TypeError, match="int"):
        gram_request(b"packed gram", 7.0)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (None, "no 'bcsfl.ckks-gram-request' record"),
        (ConfigRecord({ROUND_KEY: 1}), "'gram' is not bytes"),
        (ConfigRecord({"gram": "text", ROUND_KEY: 1}), "'gram' is not bytes"),
        (ConfigRecord({"gram": b"x"}), "must be an int"),
        (ConfigRecord({"gram": b"x", ROUND_KEY: True}), "must be an int"),
        (ConfigRecord({"gram": b"x", ROUND_KEY: "1"}), "must be an int"),
    ],
)
def test_read_gram_request_refuses_malformed_requests(record, match):
    content = RecordDict() if record is None else RecordDict({GRAM_REQUEST_RECORD_KEY: record})
    with pytest.raises(ValueError, match=match):
        read_gram_request(content)


def test_gram_digest_covers_shape_and_values():
    matrix = np.arange(9, dtype=np.float64).reshape(3, 3)
    assert gram_digest(matrix) == gram_digest(matrix.copy())
    assert gram_digest(matrix) == gram_digest(matrix.astype(np.float32))  # hashed as float64
    assert gram_digest(matrix) == gram_digest(np.asfortranarray(matrix))  # C order always
    assert gram_digest(matrix) != gram_digest(matrix.reshape(1, 9))
    nudged = matrix.copy()
    nudged[2, 1] = np.nextafter(nudged[2, 1], np.inf)
    assert gram_digest(matrix) != gram_digest(nudged)
    assert len(gram_digest(matrix)) == 64


GRAM = np.array([[4.0, 1.0, 0.5], [1.0, 9.0, -2.0], [0.5, -2.0, 1.0]])


KEEP = object()


def gram_answer(matrix=GRAM, *, sha256=None, gram_record=KEEP, digest_record=KEEP) -> Message:
    """A Gram reply; ``None`` for a record drops it, ``sha256`` overrides the digest."""
    content = gram_reply_content(matrix)
    if sha256 is not None:
        content[GRAM_DIGEST_RECORD_KEY] = ConfigRecord({"sha256": sha256})
    for key, record in ((GRAM_RECORD_KEY, gram_record), (GRAM_DIGEST_RECORD_KEY, digest_record)):
        if record is None:
            del content[key]
        elif record is not KEEP:
            content[key] = record
    return answer(content)


def gram_array(array: Array) -> ArrayRecord:
    return ArrayRecord({"gram": array})


def test_read_gram_reply_accepts_a_well_formed_reply():
    matrix, digest = read_gram_reply(gram_answer(), 3)
    np.testing.assert_array_equal(matrix, GRAM)
    assert matrix.dtype == np.float64
    assert digest == gram_digest(GRAM)


@pytest.mark.parametrize(
    ("reply", "num_models", "reason"),
    [
        (lambda: error_answer(), 3, "error reply: node crashed"),
        (lambda: gram_answer(gram_record=None), 3, "reply lacks"),
        (lambda: gram_answer(digest_record=None), 3, "reply lacks"),
        (lambda: gram_answer(gram_record=ArrayRecord({"other": Array(GRAM)})), 3, "reply lacks"),
        (lambda: gram_answer(gram_record=ConfigRecord({"gram": b"x"})), 3, "reply lacks"),
        (lambda: gram_answer(), 4, "float64[3, 3], expected float64[4, 4]"),
        (lambda: gram_answer(gram_record=gram_array(Array(GRAM.astype(np.float32)))), 3, "float32"),
        (lambda: gram_answer(gram_record=gram_array(Array(GRAM.astype(np.int64)))), 3, "int64"),
        (lambda: gram_answer(GRAM[:2]), 3, "float64[2, 3]"),
        (lambda: gram_answer(np.where(np.eye(3) > 0, np.nan, GRAM)), 3, "NaN or infinite"),
        (lambda: gram_answer(np.where(np.eye(3) > 0, np.inf, GRAM)), 3, "NaN or infinite"),
        (lambda: gram_answer(sha256="00" * 32), 3, "sha256 does not match"),
        (lambda: gram_answer(sha256=gram_digest(GRAM).upper()), 3, "sha256 does not match"),
        (
            lambda: gram_answer(digest_record=ConfigRecord({"sha256": 5})),
            3,
            "sha256 does not match",
        ),
        (
            lambda: gram_answer(gram_record=gram_array(raw_array("float64", (3, 3), b""))),
            3,
            "cannot be decoded",
        ),
        (
            lambda: gram_answer(
                gram_record=gram_array(raw_array("float64", (3, 3), b"\x93NUMPY garbage"))
            ),
            3,
            "cannot be decoded",
        ),
        (
            lambda: gram_answer(
                gram_record=gram_array(
                    Array(dtype="float64", shape=(3, 3), stype="torch.Tensor", data=b"x")
                )
            ),
            3,
            "cannot be decoded",
        ),
    ],
)
def test_read_gram_reply_turns_malformed_replies_into_reasons(reply, num_models, reason):
    outcome = read_gram_reply(reply(), num_models)
    assert isinstance(outcome, str)
    assert reason in outcome


def test_public_context_round_trips_through_an_array_record():
    data = bytes(range(256)) * 3
    reply = answer(public_context_content(data), PUBLIC_MESSAGE_TYPE)
    assert read_public_context(reply) == data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (RecordDict(), "no 'bcsfl.ckks-public' ArrayRecord"),
        (
            RecordDict({PUBLIC_RECORD_KEY: ArrayRecord({"other": Array(np.zeros(3, np.uint8))})}),
            "no",
        ),
        (
            RecordDict({PUBLIC_RECORD_KEY: ArrayRecord({"context": Array(np.zeros(3))})}),
            "1-D uint8",
        ),
        (
            RecordDict(
                {PUBLIC_RECORD_KEY: ArrayRecord({"context": Array(np.zeros((2, 2), np.uint8))})}
            ),
            "1-D uint8",
        ),
        (
            RecordDict(
                {PUBLIC_RECORD_KEY: ArrayRecord({"context": raw_array("uint8", (0,), b"")})}
            ),
            "cannot be decoded",
        ),
    ],
)
def test_read_public_context_refuses_malformed_replies(content, match):
    with pytest.raises(ValueError, match=match):
        read_public_context(answer(content, PUBLIC_MESSAGE_TYPE))


def test_read_public_context_refuses_an_error_reply():
    with pytest.raises(ValueError, match="error reply: node crashed"):
        read_public_context(error_answer(PUBLIC_MESSAGE_TYPE))
