"""The bcsfl client mod: signs train replies and serves miner duty.

Any Flower ClientApp takes part in a BCS-FL federation unchanged (unsigned mode). With
the mod, a client also

1. attaches a signed :class:`~bcsfl_flower.packets.ModelPacket` to every train reply, as
   a ConfigRecord under :data:`~bcsfl_flower.packets.PACKET_RECORD_KEY`, next to the
   reply's arrays. It signs under the EIP-712 domain the strategy puts in the train
   config (:func:`signing_config`) and for the round in ``config["server-round"]``.
   Mods run outermost first, so list ``bcsfl_mod`` first to sign exactly what is sent
   (for example arrays that an inner mod encrypted);
2. answers the miner duty message ``query.bcsfl_mine`` (:data:`MINE_MESSAGE_TYPE`): it
   verifies the candidate package and, if it holds, returns its signature of the
   round's :class:`~bcsfl_flower.packets.RoundApproval`.

Flower routes a message only to a registered handler, and mods wrap registered
handlers, so the duty also needs a ``query.bcsfl_mine`` handler; :func:`bcsfl_client_app`
builds a ClientApp with both::

    app = bcsfl_client_app()          # instead of app = ClientApp()

Keys (:func:`node_account`): ``bcsfl-keystore`` in the node config names an encrypted
keystore (password in the file named by ``bcsfl-keystore-password-file`` or in
``$BCSFL_KEYSTORE_PASSWORD``); without it, a simulated node uses the PUBLIC development
key of its ``partition-id`` (unsafe outside simulation).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from bcsfl_flower.chain.keys import client_dev_account, load_keystore
from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
    ModelPacket,
    RoundApproval,
    SignedModelPacket,
    accepted_root,
    committee_root,
    model_hash,
)

MINE_ACTION = "bcsfl_mine"
"""Action of the miner duty query (a Python identifier, as Flower requires)."""

MINE_MESSAGE_TYPE = f"{MessageType.QUERY}.{MINE_ACTION}"
"""Message type of the miner duty: ``"query.bcsfl_mine"``."""

CHAIN_ID_KEY = "bcsfl-chain-id"
"""Train-config key with the chain id of the EIP-712 domain."""

CONTRACT_KEY = "bcsfl-contract"
"""Train-config key with the audit contract address of the EIP-712 domain."""

ROUND_KEY = "server-round"
"""Train-config key with the current round (Flower's strategies set it)."""

APPROVAL_RECORD_KEY = "bcsfl.approval"
"""Duty request: the approval to sign, plus ``chain-id`` and ``contract``."""

COMMITTEE_RECORD_KEY = "bcsfl.committee"
"""Duty request: ``{"miners": [address, ...]}``, the round's whole committee."""

PACKETS_RECORD_KEY = "bcsfl.packets"
"""Duty request (optional): the accepted packets, one list per field."""

ARRAYS_RECORD_KEY = "arrays"
"""Duty request: the candidate global model."""

VERDICT_RECORD_KEY = "bcsfl.verdict"
"""Duty reply: ``approved``, ``signer``, and ``signature`` or ``reason``."""

KEYSTORE_NODE_KEY = "bcsfl-keystore"
"""Node-config key naming an encrypted JSON keystore."""

KEYSTORE_PASSWORD_FILE_NODE_KEY = "bcsfl-keystore-password-file"
"""Node-config key naming the keystore's password file."""

FRESHNESS_NODE_KEY = "bcsfl-freshness-s"
"""Node-config key: how old (seconds) a candidate package may be. Default 300."""

DEFAULT_FRESHNESS_S = 300.0

_PACKET_FIELDS = ("model-hash", "timestamp", "round", "client", "signature")


class MissingKeyError(RuntimeError):
    """The node config names no keystore and no partition id."""


# ------------------------------------------------------------------------------------------
# The mod and the handler
# ------------------------------------------------------------------------------------------


def bcsfl_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Sign train replies and answer the miner duty (see the module docstring).

    Parameters
    ----------
    msg : Message
        The incoming message.
    context : Context
        The node's context; ``node_config`` selects the key.
    call_next : ClientAppCallable
        The next mod or the app's handler.

    Returns
    -------
    Message
        The reply: the app's reply, with a packet attached for train messages; the
        mod's own verdict for the miner duty.
    """
    if msg.metadata.message_type == MINE_MESSAGE_TYPE:
        return mine(msg, context)
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        _sign_train_reply(msg, reply, context)
    return reply


def mine(msg: Message, context: Context) -> Message:
    """Handle a miner duty message: verify the candidate package and sign the approval.

    Checks, in order: the approval and domain parse; the node's key is in the committee
    and the committee hashes to ``committee_root``; the candidate arrays hash to
    ``model_hash``; the package's timestamp is within the freshness window; and, when
    the accepted packets are included, each recovers to its client, names the round,
    and together they commit to ``accepted_root``. A miner cannot check
    ``previous_hash`` without reading the chain; the contract enforces the link.

    Returns
    -------
    Message
        A reply with :data:`VERDICT_RECORD_KEY`: ``approved`` and ``signer``, plus
        ``signature`` (65 bytes) or ``reason``.
    """
    try:
        account = node_account(context)
    except (MissingKeyError, FileNotFoundError, ValueError) as err:
        return _error_reply(msg, f"bcsfl miner has no key: {err}")
    try:
        approval, domain = _parse_duty(msg.content)
        reason = _check_candidate(msg.content, approval, domain, account, context)
    except (KeyError, TypeError, ValueError) as err:
        reason = f"malformed duty message: {err}"
    if reason is not None:
        log(WARNING, "bcsfl miner %s refuses to approve: %s", account.address, reason)
        verdict = ConfigRecord({"approved": False, "signer": account.address, "reason": reason})
    else:
        verdict = ConfigRecord(
            {
                "approved": True,
                "signer": account.address,
                "signature": approval.sign(account, domain),
            }
        )
    return Message(RecordDict({VERDICT_RECORD_KEY: verdict}), reply_to=msg)


def bcsfl_client_app(mods: Iterable[Mod] = (), **kwargs: Any) -> ClientApp:
    """Return a ClientApp with :func:`bcsfl_mod` first and the miner duty registered.

    Parameters
    ----------
    mods : Iterable[Mod], optional
        Further mods, applied inside ``bcsfl_mod``.
    **kwargs
        Passed to :class:`flwr.clientapp.ClientApp`.
    """
    app = ClientApp(mods=[bcsfl_mod, *mods], **kwargs)
    app.query(MINE_ACTION)(mine)
    return app


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------

_KEYSTORE_CACHE: dict[tuple[str, str | None], LocalAccount] = {}
_WARNED_DEV_KEY: set[int] = set()


def node_account(context: Context) -> LocalAccount:
    """Return this node's signing account from its node config.

    ``bcsfl-keystore`` (with ``bcsfl-keystore-password-file`` or
    ``$BCSFL_KEYSTORE_PASSWORD``) wins; otherwise ``partition-id`` selects a PUBLIC
    development key (simulation only; a warning is logged once per partition).

    Raises
    ------
    MissingKeyError
        If the node config has neither key.
    """
    config = context.node_config
    if KEYSTORE_NODE_KEY in config:
        path = str(config[KEYSTORE_NODE_KEY])
        password_file = config.get(KEYSTORE_PASSWORD_FILE_NODE_KEY)
        cache_key = (path, None if password_file is None else str(password_file))
        if cache_key not in _KEYSTORE_CACHE:
            _KEYSTORE_CACHE[cache_key] = load_keystore(
                path, password_file=None if password_file is None else str(password_file)
            )
        return _KEYSTORE_CACHE[cache_key]
    if "partition-id" in config:
        partition_id = int(config["partition-id"])
        if partition_id not in _WARNED_DEV_KEY:
            _WARNED_DEV_KEY.add(partition_id)
            log(
                WARNING,
                "bcsfl: partition %d signs with a PUBLIC development key (simulation only; "
                "set %s in the node config for a real deployment)",
                partition_id,
                KEYSTORE_NODE_KEY,
            )
        return client_dev_account(partition_id)
    raise MissingKeyError(
        f"node config has neither {KEYSTORE_NODE_KEY!r} nor 'partition-id'; cannot sign"
    )


# ------------------------------------------------------------------------------------------
# What the strategy uses to talk to the mod
# ------------------------------------------------------------------------------------------


def signing_config(domain: Eip712Domain) -> dict[str, int | str]:
    """Return the train-config entries that make clients sign under ``domain``."""
    return {CHAIN_ID_KEY: domain.chain_id, CONTRACT_KEY: domain.verifying_contract}


def mine_request(
    approval: RoundApproval,
    domain: Eip712Domain,
    committee: Iterable[str],
    arrays: ArrayRecord,
    packets: Iterable[SignedModelPacket] = (),
) -> RecordDict:
    """Return the content of a miner duty message (send it as :data:`MINE_MESSAGE_TYPE`).

    Parameters
    ----------
    approval : RoundApproval
        The statement to approve (``AuditTrail.prepare_approval``).
    domain : Eip712Domain
        The trail's domain.
    committee : Iterable[str]
        The round's miners.
    arrays : ArrayRecord
        The candidate global model.
    packets : Iterable[SignedModelPacket], optional
        The accepted packets, so miners can check ``accepted_root``.
    """
    approval_record = approval.to_config_record()
    approval_record["chain-id"] = domain.chain_id
    approval_record["contract"] = domain.verifying_contract
    content = RecordDict(
        {
            APPROVAL_RECORD_KEY: approval_record,
            COMMITTEE_RECORD_KEY: ConfigRecord({"miners": [str(m) for m in committee]}),
            ARRAYS_RECORD_KEY: arrays,
        }
    )
    packet_list = list(packets)
    if packet_list:
        content[PACKETS_RECORD_KEY] = ConfigRecord(
            {
                "model-hash": [p.packet.model_hash for p in packet_list],
                "timestamp": [p.packet.timestamp for p in packet_list],
                "round": [p.packet.round for p in packet_list],
                "client": [p.packet.client for p in packet_list],
                "signature": [p.signature for p in packet_list],
            }
        )
    return content


@dataclass(frozen=True)
class MinerVerdict:
    """A miner's answer to the duty message.

    Attributes
    ----------
    signer : str | None
        The miner's address (None if the reply carried no verdict).
    signature : bytes | None
        Its approval signature, if it approved.
    reason : str | None
        Why it refused, or what was wrong with the reply.
    """

    signer: str | None
    signature: bytes | None
    reason: str | None

    @property
    def approved(self) -> bool:
        """Whether the miner approved (its signature still needs checking)."""
        return self.signature is not None


def read_verdict(reply: Message) -> MinerVerdict:
    """Parse a miner's reply; never raises (a faulty miner must not stop the round)."""
    if reply.has_error():
        return MinerVerdict(None, None, f"error reply: {reply.error.reason}")
    record = reply.content.config_records.get(VERDICT_RECORD_KEY)
    if record is None:
        return MinerVerdict(None, None, f"reply has no {VERDICT_RECORD_KEY!r} record")
    signer = record.get("signer")
    signer = to_checksum_address(signer) if isinstance(signer, str) and is_address(signer) else None
    signature = record.get("signature")
    if record.get("approved") is True and isinstance(signature, bytes) and signer is not None:
        return MinerVerdict(signer, signature, None)
    return MinerVerdict(signer, None, str(record.get("reason", "not approved")))


# ------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------


def _sign_train_reply(msg: Message, reply: Message, context: Context) -> None:
    config = msg.content.config_records.get("config")
    if config is None or CHAIN_ID_KEY not in config or CONTRACT_KEY not in config:
        return  # the strategy runs no audit trail: stay unsigned
    arrays = _reply_arrays(reply.content)
    if arrays is None:
        log(WARNING, "bcsfl_mod: the train reply has no single ArrayRecord; not signing")
        return
    if ROUND_KEY not in config:
        log(WARNING, "bcsfl_mod: train config lacks %r; not signing", ROUND_KEY)
        return
    try:
        account = node_account(context)
    except (MissingKeyError, FileNotFoundError, ValueError) as err:
        log(WARNING, "bcsfl_mod: cannot sign the train reply: %s", err)
        return
    domain = Eip712Domain(int(config[CHAIN_ID_KEY]), str(config[CONTRACT_KEY]))
    packet = ModelPacket(
        model_hash=model_hash(arrays),
        timestamp=int(time.time()),
        round=int(config[ROUND_KEY]),
        client=account.address,
    )
    reply.content[PACKET_RECORD_KEY] = packet.sign(account, domain).to_config_record()


def _reply_arrays(content: RecordDict) -> ArrayRecord | None:
    records = content.array_records
    if ARRAYS_RECORD_KEY in records:
        return records[ARRAYS_RECORD_KEY]
    if len(records) == 1:
        return next(iter(records.values()))
    return None


def _parse_duty(content: RecordDict) -> tuple[RoundApproval, Eip712Domain]:
    record = content.config_records.get(APPROVAL_RECORD_KEY)
    if record is None:
        raise ValueError(f"no {APPROVAL_RECORD_KEY!r} record")
    approval = RoundApproval.from_config_record(record)
    domain = Eip712Domain(int(record["chain-id"]), str(record["contract"]))
    return approval, domain


def _check_candidate(
    content: RecordDict,
    approval: RoundApproval,
    domain: Eip712Domain,
    account: LocalAccount,
    context: Context,
) -> str | None:
    """Return why the candidate must not be approved, or None if it holds."""
    committee_record = content.config_records.get(COMMITTEE_RECORD_KEY)
    if committee_record is None or "miners" not in committee_record:
        return f"no {COMMITTEE_RECORD_KEY!r} record"
    miners = list(committee_record["miners"])
    if committee_root(miners) != approval.committee_root:
        return "the committee does not hash to the approval's committee root"
    if account.address not in {to_checksum_address(m) for m in miners}:
        return f"{account.address} is not in the round's committee"
    arrays = content.array_records.get(ARRAYS_RECORD_KEY)
    if arrays is None:
        return f"no {ARRAYS_RECORD_KEY!r} ArrayRecord with the candidate model"
    actual = model_hash(arrays)
    if actual != approval.model_hash:
        return (
            f"the candidate arrays hash to 0x{actual.hex()}, the approval names "
            f"0x{approval.model_hash.hex()}"
        )
    window = float(context.node_config.get(FRESHNESS_NODE_KEY, DEFAULT_FRESHNESS_S))
    age = time.time() - approval.timestamp
    if not -window <= age <= window:
        return f"the package timestamp {approval.timestamp} is {age:.0f} s old (window {window})"
    packets_record = content.config_records.get(PACKETS_RECORD_KEY)
    if packets_record is not None:
        return _check_packets(packets_record, approval, domain)
    return None


def _check_packets(
    record: Mapping[str, Any], approval: RoundApproval, domain: Eip712Domain
) -> str | None:
    columns = [list(record[name]) for name in _PACKET_FIELDS]
    if len({len(column) for column in columns}) != 1:
        return "the packet lists have different lengths"
    packets = []
    for model, timestamp, round_number, client, signature in zip(*columns, strict=True):
        signed = SignedModelPacket(ModelPacket(model, timestamp, round_number, client), signature)
        if signed.packet.round != approval.round:
            return f"packet of {client} is for round {round_number}, not {approval.round}"
        try:
            signer = signed.recover(domain)
        except ValueError as err:
            return f"packet of {client} has an invalid signature: {err}"
        if signer != signed.packet.client:
            return f"packet claims client {client} but was signed by {signer}"
        packets.append(signed)
    if accepted_root(packets, domain) != approval.accepted_root:
        return "the accepted packets do not hash to the approval's accepted root"
    return None


def _error_reply(msg: Message, reason: str) -> Message:
    log(WARNING, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
