"""Every message format that crosses the wire between the BCSFL strategy and its clients.

Server side (the strategy, the notary, the CKKS update space) and client side (the
bcsfl and CKKS mods) both import this module, so a record key or a message type is
defined exactly once and the server never imports ``bcsfl_flower.client``.

Four exchanges use it:

* **train** (Flower's own ``train`` message): the strategy adds
  :func:`signing_config` (and the CKKS flag) to the train config; a client running the
  bcsfl mod answers with a signed packet under :data:`PACKET_RECORD_KEY`.
* **validation** (Flower's own ``evaluate`` message): :func:`validation_requests`
  sends every validator the current model and each candidate, named under
  :data:`CANDIDATE_CONFIG_KEY`; :func:`read_loss` reads the loss each reply reports.
* **committee duty** (Flower's ``evaluate`` message, answered by the bcsfl mod): a
  member running the mod gets one message that carries every model it validates and
  every candidate it mines (:func:`duty_content` / :func:`read_duty`), so validation
  and mining take one exchange. Each candidate's part is a :func:`mine_request`
  (:func:`read_mine_request`), answered with :func:`verdict_content`;
  :func:`read_duty_loss` and :func:`read_duty_verdict` read the member's answer.
* **CKKS** (``query.bcsfl_ckks_gram`` and ``query.bcsfl_ckks_public``): the server
  asks key holders to decrypt a packed Gram matrix and one client for the public
  context.

Readers never raise on what a client sent: a malformed reply becomes a reason.
"""

from __future__ import annotations

from bcsfl_flower.protocol.ckks import (
    GRAM_ACTION,
    GRAM_DIGEST_RECORD_KEY,
    GRAM_MESSAGE_TYPE,
    GRAM_RECORD_KEY,
    GRAM_REQUEST_RECORD_KEY,
    PUBLIC_ACTION,
    PUBLIC_MESSAGE_TYPE,
    PUBLIC_RECORD_KEY,
    gram_digest,
    gram_reply_content,
    gram_request,
    is_ckks_work,
    public_context_content,
    read_gram_reply,
    read_gram_request,
    read_public_context,
)
from bcsfl_flower.protocol.config import (
    BASELINE_CANDIDATE,
    BUDGET_REFUSAL,
    CANDIDATE_CONFIG_KEY,
    CHAIN_ID_KEY,
    CKKS_CONFIG_KEY,
    CONTRACT_KEY,
    DEVELOPMENT_KEYS_KEY,
    DP_EPSILON_KEY,
    ROUND_KEY,
    RUN_KEY,
    ConfigValue,
    all_refused_for_budget,
    config_domain,
    config_value,
    model_record,
    packet_record,
    signing_config,
    signing_domain,
)
from bcsfl_flower.protocol.duty import (
    DUTY_CAPABLE_RECORD_KEY,
    DUTY_ERRORS_RECORD_KEY,
    DUTY_METRICS_PREFIX,
    DUTY_MODEL_PREFIX,
    DUTY_RECORD_KEY,
    CommitteeDuty,
    duty_content,
    duty_losses,
    duty_reply_content,
    evaluation_content,
    read_duty,
    read_duty_ballot,
    read_duty_loss,
    read_duty_verdict,
    serves_duty,
)
from bcsfl_flower.protocol.mining import (
    APPROVAL_RECORD_KEY,
    CANDIDATE_RECORD_KEY,
    COMMITTEE_RECORD_KEY,
    PACKETS_RECORD_KEY,
    ROLLBACK_CANDIDATE,
    ROLLBACK_RECORD_KEY,
    STATEMENT_RECORD_KEY,
    VERDICT_RECORD_KEY,
    MineRequest,
    MinerVerdict,
    mine_request,
    read_mine_request,
    rollback_request,
    verdict_content,
)
from bcsfl_flower.protocol.validation import (
    ValidationRequest,
    read_loss,
    validation_requests,
)

__all__ = [
    "APPROVAL_RECORD_KEY",
    "BASELINE_CANDIDATE",
    "BUDGET_REFUSAL",
    "CANDIDATE_CONFIG_KEY",
    "CANDIDATE_RECORD_KEY",
    "CHAIN_ID_KEY",
    "CKKS_CONFIG_KEY",
    "COMMITTEE_RECORD_KEY",
    "CONTRACT_KEY",
    "CommitteeDuty",
    "ConfigValue",
    "DEVELOPMENT_KEYS_KEY",
    "DP_EPSILON_KEY",
    "DUTY_CAPABLE_RECORD_KEY",
    "DUTY_ERRORS_RECORD_KEY",
    "DUTY_METRICS_PREFIX",
    "DUTY_MODEL_PREFIX",
    "DUTY_RECORD_KEY",
    "GRAM_ACTION",
    "GRAM_DIGEST_RECORD_KEY",
    "GRAM_MESSAGE_TYPE",
    "GRAM_RECORD_KEY",
    "GRAM_REQUEST_RECORD_KEY",
    "MineRequest",
    "MinerVerdict",
    "PACKETS_RECORD_KEY",
    "PUBLIC_ACTION",
    "PUBLIC_MESSAGE_TYPE",
    "PUBLIC_RECORD_KEY",
    "ROLLBACK_CANDIDATE",
    "ROLLBACK_RECORD_KEY",
    "ROUND_KEY",
    "RUN_KEY",
    "STATEMENT_RECORD_KEY",
    "VERDICT_RECORD_KEY",
    "ValidationRequest",
    "all_refused_for_budget",
    "config_domain",
    "config_value",
    "duty_content",
    "duty_losses",
    "duty_reply_content",
    "evaluation_content",
    "gram_digest",
    "gram_reply_content",
    "gram_request",
    "is_ckks_work",
    "mine_request",
    "model_record",
    "packet_record",
    "public_context_content",
    "read_duty",
    "read_duty_ballot",
    "read_duty_loss",
    "read_duty_verdict",
    "read_gram_reply",
    "read_gram_request",
    "read_loss",
    "read_mine_request",
    "read_public_context",
    "rollback_request",
    "serves_duty",
    "signing_config",
    "signing_domain",
    "validation_requests",
    "verdict_content",
]
