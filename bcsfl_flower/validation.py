"""Committee validation: candidates go to validators as ordinary ``evaluate`` messages.

Each validator evaluates the current global model ``w_t`` and every candidate on its
own data through the ClientApp's standard ``@app.evaluate()`` handler, so any Flower
ClientApp that implements evaluate can serve as a validator with no new code. The
losses it reports become loss deltas ``dE = loss(w_t) - loss(candidate)``, which
:mod:`bcsfl_flower.consensus` turns into votes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

BASELINE = "w_t"
"""Candidate id of the current global model, which every validator also evaluates."""

CANDIDATE_CONFIG_KEY = "bcsfl-candidate"
"""Config key naming the candidate in each evaluate message (it also makes every
message to the same validator distinct)."""


@dataclass(frozen=True)
class ValidatorReport:
    """What one validator said about the baseline and each candidate.

    Attributes
    ----------
    validator : str
        The validator's node id.
    baseline_loss : float
        Its loss on ``w_t``; NaN if it did not report one.
    candidate_losses : dict[str, float]
        Its loss on each candidate; NaN where it did not report one.
    problems : tuple[str, ...]
        Why some losses are missing (error replies, a missing or non-finite loss key,
        no reply before the timeout).
    """

    validator: str
    baseline_loss: float
    candidate_losses: dict[str, float]
    problems: tuple[str, ...]

    def deltas(self, candidate_ids: Sequence[str]) -> np.ndarray:
        """Return ``dE = loss(w_t) - loss(candidate)`` for ``candidate_ids``, NaN where unknown."""
        return np.array(
            [self.baseline_loss - self.candidate_losses[c] for c in candidate_ids],
            dtype=np.float64,
        )


class CommitteeValidation:
    """Send candidates to the validators and collect their losses.

    Parameters
    ----------
    loss_metric_key : str
        Key of the loss in the validators' evaluate MetricRecord (Flower's PyTorch
        template reports ``"eval_loss"``).
    timeout : float
        Seconds to wait for the validators' replies; a validator that has not
        answered by then abstains.
    """

    def __init__(self, loss_metric_key: str = "eval_loss", timeout: float = 600.0) -> None:
        self.loss_metric_key = loss_metric_key
        self.timeout = timeout

    def evaluate(
        self,
        grid: Grid,
        server_round: int,
        validators: Sequence[str],
        baseline: ArrayRecord,
        candidates: Mapping[str, ArrayRecord],
        extra_config: Mapping[str, bool | int | float | str] | None = None,
    ) -> list[ValidatorReport]:
        """Have every validator evaluate ``baseline`` and all ``candidates``.

        ``extra_config`` is added to every evaluate message's config (CKKS mode uses it
        to tell the validators' mod to decrypt the models). Returns one report per
        validator, in the order of ``validators``.
        """
        models = {BASELINE: baseline, **candidates}
        sent: dict[str, tuple[str, str]] = {}
        messages = []
        for validator in validators:
            for candidate_id, arrays in models.items():
                config = ConfigRecord(
                    {
                        **(extra_config or {}),
                        "server-round": server_round,
                        CANDIDATE_CONFIG_KEY: candidate_id,
                    }
                )
                messages.append(
                    Message(
                        content=RecordDict({"arrays": arrays, "config": config}),
                        dst_node_id=int(validator),
                        message_type=MessageType.EVALUATE,
                    )
                )
        log(
            INFO,
            "validation: %d validators x %d models (w_t + %d candidates)",
            len(validators),
            len(models),
            len(candidates),
        )
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        for message, (validator, candidate_id) in zip(
            messages,
            ((v, c) for v in validators for c in models),
            strict=True,
        ):
            sent[message.metadata.message_id] = (str(validator), candidate_id)
        losses: dict[str, dict[str, float]] = {str(v): {} for v in validators}
        problems: dict[str, list[str]] = {str(v): [] for v in validators}
        for reply in replies:
            key = sent.get(reply.metadata.reply_to_message_id)
            if key is None:
                log(WARNING, "validation: ignoring a reply to an unknown message")
                continue
            validator, candidate_id = key
            loss, problem = self._loss_of(reply)
            if problem is not None:
                problems[validator].append(f"{candidate_id}: {problem}")
            losses[validator][candidate_id] = loss
        reports = []
        for validator in map(str, validators):
            missing = [c for c in models if c not in losses[validator]]
            if missing:
                problems[validator].append(f"no reply for {missing}")
            reports.append(
                ValidatorReport(
                    validator=validator,
                    baseline_loss=losses[validator].get(BASELINE, math.nan),
                    candidate_losses={c: losses[validator].get(c, math.nan) for c in candidates},
                    problems=tuple(problems[validator]),
                )
            )
        return reports

    def _loss_of(self, reply: Message) -> tuple[float, str | None]:
        if reply.has_error():
            return math.nan, f"error reply: {reply.error.reason}"
        for record in reply.content.metric_records.values():
            value = record.get(self.loss_metric_key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                return math.nan, f"'{self.loss_metric_key}' is not a number: {value!r}"
            if not math.isfinite(value):
                return math.nan, f"'{self.loss_metric_key}' is not finite: {value!r}"
            return float(value), None
        return math.nan, f"metric '{self.loss_metric_key}' missing"
