"""The bcsfl client mod: signs train replies and serves committee duty.

Any Flower ClientApp takes part in a BCS-FL federation unchanged (unsigned mode). With
the mod, a client also

1. marks every train reply as coming from a node that serves committee duties
   (:data:`~bcsfl_flower.protocol.DUTY_CAPABLE_RECORD_KEY`), and attaches a signed
   :class:`~bcsfl_flower.packets.ModelPacket` to it, as
   a ConfigRecord under :data:`~bcsfl_flower.packets.PACKET_RECORD_KEY`, next to the
   reply's arrays. It signs under the EIP-712 domain the strategy puts in the train
   config (:func:`signing_config`) and for the round in ``config["server-round"]``.
   Mods run outermost first, so list ``bcsfl_mod`` first to sign exactly what is sent
   (for example arrays that an inner mod encrypted);
2. serves a committee duty (an ``evaluate`` message that carries
   :data:`~bcsfl_flower.protocol.DUTY_RECORD_KEY`). As a validator it runs the app's own
   evaluate handler once per model and signs a :class:`~bcsfl_flower.ballots.Ballot` of
   the losses; as a miner it recomputes the round's decision from the statement's
   ballots (:func:`~bcsfl_flower.round.conclusion.conclude`) and signs the
   :class:`~bcsfl_flower.approvals.RoundApproval` or
   :class:`~bcsfl_flower.approvals.RoundRollback` only if the ballots decide it.

The duty arrives as an ``evaluate`` message, so the app needs its ``@app.evaluate()``
handler (which it has to validate anyway) and nothing else::

    app = bcsfl_client_app()          # instead of app = ClientApp()

Keys (:func:`node_account`): ``bcsfl-keystore`` in the node config names an encrypted
keystore (password in the file named by ``bcsfl-keystore-password-file`` or in
``$BCSFL_KEYSTORE_PASSWORD``); without it, a simulated node uses the PUBLIC development
key of its ``partition-id`` (unsafe outside simulation).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import time
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from flwr.app import (
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

from bcsfl_flower.approvals import (
    RoundApproval,
    RoundRollback,
    committee_root,
)
from bcsfl_flower.ballots import Ballot, SignedBallot
from bcsfl_flower.chain.keys import client_dev_account, load_keystore
from bcsfl_flower.client.chain_view import OwnChainView
from bcsfl_flower.packets import (
    PACKET_RECORD_KEY,
    Eip712Domain,
    ModelPacket,
    SignedModelPacket,
    accepted_root,
    model_hash,
    to_hex,
)
from bcsfl_flower.protocol import (
    BASELINE_CANDIDATE,
    DEVELOPMENT_KEYS_KEY,
    DUTY_CAPABLE_RECORD_KEY,
    ROUND_KEY,
    CommitteeDuty,
    MineRequest,
    config_domain,
    config_value,
    duty_losses,
    duty_reply_content,
    evaluation_content,
    model_record,
    read_duty,
    read_mine_request,
    signing_domain,
    verdict_content,
)
from bcsfl_flower.round.conclusion import (
    conclude,
    false_ballot_records,
    stated_rollback_reason,
)
from bcsfl_flower.round.statement import RoundStatement

KEYSTORE_NODE_KEY = "bcsfl-keystore"
"""Node-config key naming an encrypted JSON keystore."""

KEYSTORE_PASSWORD_FILE_NODE_KEY = "bcsfl-keystore-password-file"
"""Node-config key naming the keystore's password file."""

FRESHNESS_NODE_KEY = "bcsfl-freshness-s"
"""Node-config key: how old (seconds) a candidate package may be. Default 300."""

DEFAULT_FRESHNESS_S = 300.0


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
    if msg.metadata.message_type == MessageType.EVALUATE:
        try:
            duty = read_duty(msg.content)
        except ValueError as err:
            return _error_reply(msg, f"malformed committee duty: {err}")
        if duty is not None:
            return serve_duty(msg, duty, context, call_next)
    reply = call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
        reply.content[DUTY_CAPABLE_RECORD_KEY] = ConfigRecord({"committee-duty": True})
        _sign_train_reply(msg, reply, context)
    return reply


def serve_duty(
    msg: Message, duty: CommitteeDuty, context: Context, call_next: ClientAppCallable
) -> Message:
    """Serve a committee duty: evaluate every model, then approve every candidate asked.

    Each model goes through ``call_next`` as the ordinary evaluate message a validator
    without the mod would get (:func:`~bcsfl_flower.protocol.evaluation_content`), so
    the app's own evaluate handler, and any inner mod (the CKKS mod decrypts), serve
    it unchanged. A model whose evaluation fails is reported by name; the others still
    count. Each candidate to mine is checked (:func:`_candidate_fault`) and signed, or
    refused with the reason.
    """
    metrics: dict[str, RecordDict] = {}
    errors: dict[str, str] = {}
    for name in duty.models:
        # Flower's stubs leave out the (metadata, content) form its Message accepts
        inner = Message(  # type: ignore[call-overload]
            metadata=copy.copy(msg.metadata), content=evaluation_content(duty, name)
        )
        try:
            reply = call_next(inner, context)
        except Exception as err:  # the app's handler may raise anything
            errors[name] = f"{type(err).__name__}: {err}"
            continue
        if reply.has_error():
            errors[name] = reply.error.reason or f"error code {reply.error.code}"
        else:
            metrics[name] = reply.content
    ballot = _signed_ballot(duty, metrics, context)
    verdicts: dict[str, RecordDict] = {}
    if duty.mining:
        try:
            account = node_account(context, development_keys=_development_keys(duty.config))
        except (MissingKeyError, FileNotFoundError, ValueError) as err:
            return _error_reply(msg, f"bcsfl miner has no key: {err}")
        for name, request in duty.mining.items():
            verdicts[name] = _verdict(request, account, context)
    return Message(duty_reply_content(metrics, verdicts, errors, ballot), reply_to=msg)


def bcsfl_client_app(mods: Iterable[Mod] = (), **kwargs: Any) -> ClientApp:
    """Return a ClientApp with :func:`bcsfl_mod` as its first (outermost) mod.

    Parameters
    ----------
    mods : Iterable[Mod], optional
        Further mods, applied inside ``bcsfl_mod``.
    **kwargs
        Passed to :class:`flwr.clientapp.ClientApp`.
    """
    return ClientApp(mods=[bcsfl_mod, *mods], **kwargs)


# ------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------

_KEYSTORE_CACHE: dict[tuple[str, str | None], LocalAccount] = {}
_WARNED_DEV_KEY: set[int] = set()


def node_account(context: Context, *, development_keys: bool) -> LocalAccount:
    """Return this node's signing account from its node config.

    ``bcsfl-keystore`` (with ``bcsfl-keystore-password-file`` or
    ``$BCSFL_KEYSTORE_PASSWORD``) wins; otherwise, only when ``development_keys`` (the
    server's signing config says its trail registered the development accounts: a
    simulation), ``partition-id`` selects a PUBLIC development key (a warning is logged
    once per partition).

    Raises
    ------
    MissingKeyError
        If the node config has no keystore and the development key is not allowed.
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
    if "partition-id" not in config:
        raise MissingKeyError(
            f"node config has neither {KEYSTORE_NODE_KEY!r} nor 'partition-id'; cannot sign"
        )
    if not development_keys:
        raise MissingKeyError(
            f"node config has no {KEYSTORE_NODE_KEY!r}, and this federation's trail does not "
            "register the PUBLIC development keys (they are for simulation only): set "
            f"{KEYSTORE_NODE_KEY} (and {KEYSTORE_PASSWORD_FILE_NODE_KEY}) in the node config"
        )
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


# ------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------


def _development_keys(config: Mapping[str, Any]) -> bool:
    """Whether a duty's config admits the public development keys (simulation)."""
    return config.get(DEVELOPMENT_KEYS_KEY) is True


def _sign_train_reply(msg: Message, reply: Message, context: Context) -> None:
    domain = signing_domain(msg.content)
    if domain is None:
        return  # the strategy runs no audit trail: stay unsigned
    try:
        _, arrays = model_record(reply.content)
    except ValueError:
        log(WARNING, "bcsfl_mod: the train reply has no single ArrayRecord; not signing")
        return
    server_round = config_value(msg.content, ROUND_KEY)
    if server_round is None:
        log(WARNING, "bcsfl_mod: train config lacks %r; not signing", ROUND_KEY)
        return
    allowed = config_value(msg.content, DEVELOPMENT_KEYS_KEY) is True
    try:
        account = node_account(context, development_keys=allowed)
    except (MissingKeyError, FileNotFoundError, ValueError) as err:
        log(WARNING, "bcsfl_mod: cannot sign the train reply: %s", err)
        return
    packet = ModelPacket(
        model_hash=model_hash(arrays),
        timestamp=int(time.time()),
        round=int(server_round),  # type: ignore[arg-type]  # int() rejects a non-number
        client=account.address,
    )
    reply.content[PACKET_RECORD_KEY] = packet.sign(account, domain).to_config_record()


def _signed_ballot(
    duty: CommitteeDuty, metrics: Mapping[str, RecordDict], context: Context
) -> SignedBallot | None:
    """Sign the losses this validator reports, when the duty asks for a ballot.

    A duty asks when it names the loss metric and carries the signing domain; a node
    without a key answers unsigned, and its losses then count only where the federation
    admits unsigned clients.
    """
    try:
        domain = config_domain(duty.config)
    except (TypeError, ValueError) as err:
        log(WARNING, "bcsfl validator: the duty's signing domain is malformed: %s", err)
        return None
    if duty.loss_key is None or domain is None or BASELINE_CANDIDATE not in duty.models:
        return None
    try:
        account = node_account(context, development_keys=_development_keys(duty.config))
    except (MissingKeyError, FileNotFoundError, ValueError) as err:
        log(WARNING, "bcsfl validator: cannot sign its ballot: %s", err)
        return None
    losses = duty_losses(duty, metrics)
    hashes = {name: model_hash(arrays) for name, arrays in duty.models.items()}
    ballot = Ballot(
        round=int(duty.config.get(ROUND_KEY, 0)),
        validator=account.address,
        previous_hash=hashes[BASELINE_CANDIDATE],
        models=tuple(hashes.values()),
        losses=tuple(float(losses[name]) for name in hashes),
    )
    return ballot.sign(account, domain)


def _verdict(content: RecordDict, account: LocalAccount, context: Context) -> RecordDict:
    """Check one mine request and return the signed approval, or the refusal and why.

    A miner that refuses a commit for what the round holds (its ballots, candidate,
    timestamp or packets), not for who asks it, signs the round's rollback instead
    (:meth:`~bcsfl_flower.approvals.RoundApproval.refusal`): a quorum of such refusals
    certifies the rollback, so it is not the operator's word alone.
    """
    try:
        request, statement = read_mine_request(content), None
        reason = _standing_fault(request, account, context)
        refusal = None
        if reason is None:
            statement, reason = _read_statement(request)
        if statement is not None:
            reason = _candidate_fault(request, statement, context)
            if reason is not None and isinstance(request.approval, RoundApproval):
                refusal = request.approval.refusal().sign(account, request.domain)
    except (KeyError, TypeError, ValueError) as err:
        request, reason, refusal = None, f"malformed duty message: {err}", None
    if request is None or reason is not None:
        log(WARNING, "bcsfl miner %s refuses to approve: %s", account.address, reason)
        return verdict_content(account.address, reason=str(reason), refusal=refusal)
    return verdict_content(
        account.address, signature=request.approval.sign(account, request.domain)
    )


def _standing_fault(request: MineRequest, account: LocalAccount, context: Context) -> str | None:
    """Return why this miner must sign nothing for the request, or None.

    The request must name a committee that hashes to the signed root and holds this
    miner, under a signing domain that is the miner's own chain's, where it has one.
    """
    approval = request.approval
    if request.miners is None:
        return "the request names no committee"
    if committee_root(list(request.miners)) != approval.committee_root:
        return "the committee does not hash to the approval's committee root"
    if account.address not in {to_checksum_address(m) for m in request.miners}:
        return f"{account.address} is not in the round's committee"
    own_chain = OwnChainView.of(context.node_config)
    if own_chain is not None and (fault := own_chain.fault(request.domain, approval)):
        return fault
    return None


def _read_statement(request: MineRequest) -> tuple[RoundStatement | None, str | None]:
    """Return the statement the request asks to sign, or why it cannot be read.

    It must hash to the signed state root and be that round's, from the model the
    round starts from: a miner signs nothing, not even a refusal, over a statement it
    has not read.
    """
    approval = request.approval
    if request.statement is None:
        return None, "the request carries no statement to recompute the decision from"
    if hashlib.sha256(request.statement).digest() != approval.state_root:
        return None, "the statement does not hash to the state root it asks to sign"
    try:
        statement = RoundStatement.from_bytes(request.statement)
    except ValueError as err:
        return None, f"the statement is malformed: {err}"
    start = to_hex(approval.start_hash)
    if (statement.round, statement.previous_hash) != (approval.round, start):
        return None, f"the statement is round {statement.round}'s from {statement.previous_hash}"
    return statement, None


def _candidate_fault(
    request: MineRequest, statement: RoundStatement, context: Context
) -> str | None:
    """Return why the candidate (or the rollback) must not be signed, or None if it holds."""
    approval = request.approval
    fault = _decision_fault(approval, statement, request.domain)
    if fault is not None or isinstance(approval, RoundRollback):
        return fault
    if request.arrays is None:
        return "the request carries no candidate model"
    actual = model_hash(request.arrays)
    if actual != approval.model_hash:
        return (
            f"the candidate arrays hash to 0x{actual.hex()}, the approval names "
            f"0x{approval.model_hash.hex()}"
        )
    window = float(context.node_config.get(FRESHNESS_NODE_KEY, DEFAULT_FRESHNESS_S))
    age = time.time() - approval.timestamp
    if not -window <= age <= window:
        return f"the package timestamp {approval.timestamp} is {age:.0f} s old (window {window})"
    if request.packets is not None:
        return _packets_fault(request, approval)
    return None


def _decision_fault(
    approval: RoundApproval | RoundRollback, statement: RoundStatement, domain: Eip712Domain
) -> str | None:
    """Return why the ballots do not support what the miner is asked to sign, or None.

    The miner recomputes the decision from the statement it is asked to sign
    (:func:`~bcsfl_flower.round.conclusion.conclude`, the pipeline's own function): a
    commit must be the candidate the ballots carry, a rollback a round they carry none.
    It signs neither over a statement whose record of its ballots is false (a valid
    ballot recorded as rejected, or one that does not check recorded as counting):
    otherwise an operator that garbles ballots in flight could have honest miners
    certify a rollback blamed on the validators.
    """
    false_records = false_ballot_records(statement, domain)
    if false_records:
        return f"the statement's record of its ballots is false: {false_records[0]}"
    decision, _ = conclude(statement, domain)
    if isinstance(approval, RoundRollback):
        if decision.committed:
            return f"the ballots commit {decision.candidate}"
        expected = stated_rollback_reason(statement, domain)
        if approval.reason != expected:
            return (
                f"the rollback's reason is {approval.reason!r:.80}, the ballots' {expected!r:.80}"
            )
        return None
    if not decision.committed or statement.plan is None:
        return f"the ballots commit no candidate ({decision.reason})"
    committed = statement.plan.scored.get(str(decision.candidate))
    if committed != to_hex(approval.model_hash):
        return f"the ballots commit {decision.candidate} ({committed}), not the model asked"
    return None


def _packets_fault(request: MineRequest, approval: RoundApproval) -> str | None:
    """Return why the request's accepted packets do not support ``approval``, or None."""
    for signed in request.packets or ():
        if signed.packet.round != approval.round:
            return (
                f"packet of {signed.packet.client} is for round {signed.packet.round}, "
                f"not {approval.round}"
            )
        try:
            signer = _signer(signed, request.domain)
        except ValueError as err:
            return f"packet of {signed.packet.client} has an invalid signature: {err}"
        if signer != signed.packet.client:
            return f"packet claims client {signed.packet.client} but was signed by {signer}"
    if accepted_root(list(request.packets or ()), request.domain) != approval.accepted_root:
        return "the accepted packets do not hash to the approval's accepted root"
    return None


@functools.lru_cache(maxsize=1024)
def _signer(signed: SignedModelPacket, domain: Eip712Domain) -> str:
    """Recover a packet's signer once: a duty lists the same packets for every candidate."""
    return signed.recover(domain)


def _error_reply(msg: Message, reason: str) -> Message:
    log(WARNING, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
