"""The validation exchange: candidates go to the validators as ordinary ``evaluate`` messages.

Each validator evaluates the current global model ``w_t`` and every candidate on its
own data through the ClientApp's standard ``@app.evaluate()`` handler, so any Flower
ClientApp that implements evaluate can serve as a validator with no new code. One
exchange carries every candidate; the losses come back as
:class:`~bcsfl_flower.round.state.ValidatorReport` objects, which a selection rule
turns into a decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.protocol import (
    BASELINE_CANDIDATE,
    ConfigValue,
    read_loss,
    validation_requests,
)
from bcsfl_flower.round.settings import ValidationSettings
from bcsfl_flower.round.state import ValidatorReport


def validate(
    grid: Grid,
    server_round: int,
    validators: Sequence[str],
    baseline: ArrayRecord,
    candidates: Mapping[str, ArrayRecord],
    settings: ValidationSettings,
    extra_config: Mapping[str, ConfigValue] | None = None,
) -> tuple[ValidatorReport, ...]:
    """Have every validator evaluate ``baseline`` and all ``candidates``.

    Returns one report per validator, in the order of ``validators``. Replies to
    unknown messages and repeated replies are ignored; missing or unusable losses
    are NaN, with the reason in the report's ``problems``.
    """
    models = {BASELINE_CANDIDATE: baseline, **candidates}
    requests = validation_requests(
        validators,
        models,
        server_round,
        arrayrecord_key=settings.arrayrecord_key,
        configrecord_key=settings.configrecord_key,
        extra_config=extra_config,
    )
    log(
        INFO,
        "validation: %d validators x %d models (w_t + %d candidates)",
        len(validators),
        len(models),
        len(candidates),
    )
    if not requests:
        return ()
    replies = list(grid.send_and_receive([r.message for r in requests], timeout=settings.timeout))
    sent = {r.message.metadata.message_id: r for r in requests}
    losses: dict[str, dict[str, float]] = {str(v): {} for v in validators}
    problems: dict[str, list[str]] = {str(v): [] for v in validators}
    for reply in replies:
        request = sent.pop(reply.metadata.reply_to_message_id, None)
        if request is None:
            log(WARNING, "validation: ignoring a reply to an unknown or answered message")
            continue
        loss, problem = read_loss(reply, settings.loss_metric_key)
        if problem is not None:
            problems[request.validator].append(f"{request.candidate}: {problem}")
        losses[request.validator][request.candidate] = loss
    reports = []
    for validator in map(str, validators):
        missing = [name for name in models if name not in losses[validator]]
        if missing:
            problems[validator].append(f"no reply for {missing}")
        reports.append(
            ValidatorReport(
                validator=validator,
                baseline_loss=losses[validator].get(BASELINE_CANDIDATE, math.nan),
                candidate_losses={c: losses[validator].get(c, math.nan) for c in candidates},
                problems=tuple(problems[validator]),
            )
        )
    return tuple(reports)
