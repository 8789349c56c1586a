"""The committee exchange: validators score the candidates, miners sign them, in one go.

Each validator evaluates the current global model ``w_t`` and every candidate on its
own data through the ClientApp's standard ``@app.evaluate()`` handler, so any Flower
ClientApp that implements evaluate can serve as a validator with no new code: a
validator without the bcsfl mod gets one ordinary ``evaluate`` message per model.

A member that runs the bcsfl mod (it signed its train reply) gets a single committee
duty message instead (:class:`~bcsfl_flower.protocol.CommitteeDuty`): every model it
validates and, if it is also a miner, every candidate's approval to sign. Its mod runs
the app's evaluate handler once per model and signs each approval, so validation and
mining take one exchange, and the round waits for the committee once. The losses come
back as :class:`~bcsfl_flower.round.state.ValidatorReport` objects, which a selection
rule turns into a decision; the signatures for the candidate that commits make its
quorum certificate, the others are discarded.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.ballots import SignedBallot
from bcsfl_flower.protocol import (
    BASELINE_CANDIDATE,
    ROUND_KEY,
    CommitteeDuty,
    ConfigValue,
    MinerVerdict,
    duty_content,
    read_duty_ballot,
    read_duty_loss,
    read_duty_verdict,
    read_loss,
    validation_requests,
)
from bcsfl_flower.round.conclusion import unsigned_ballot
from bcsfl_flower.round.settings import RoundSettings
from bcsfl_flower.round.state import ValidatorReport
from bcsfl_flower.round.statement import UNSIGNED_PREFIX, RoundStatement


@dataclass(frozen=True)
class ValidationSettings:
    """How validators are asked and read: the round's settings plus FedAvg's record names.

    Attributes
    ----------
    loss_metric_key : str
        Key of the loss in the validators' evaluate replies.
    timeout : float
        Seconds to wait; a validator that has not answered by then abstains.
    arrayrecord_key, configrecord_key : str
        Record names of the evaluate messages (the strategy's FedAvg arguments).
    """

    loss_metric_key: str
    timeout: float
    arrayrecord_key: str
    configrecord_key: str

    @classmethod
    def of(
        cls, settings: RoundSettings, arrayrecord_key: str, configrecord_key: str
    ) -> ValidationSettings:
        """Return the validation settings of validated round settings and FedAvg's keys."""
        return cls(
            settings.loss_metric_key, settings.committee_timeout, arrayrecord_key, configrecord_key
        )


@dataclass(frozen=True)
class CommitteeAnswers:
    """What the committee answered in the round's exchange.

    Attributes
    ----------
    reports : tuple[ValidatorReport, ...]
        One per validator, in draw order.
    verdicts : Mapping[str, Mapping[str, MinerVerdict]]
        Candidate name (or the rollback's) -> miner node id -> its verdict (miners that
        did not answer are missing).
    ballots : Mapping[str, SignedBallot]
        Validator node id -> the ballot it signed (validators that signed none, or a
        malformed one, are missing; the report's problems say which).
    """

    reports: tuple[ValidatorReport, ...]
    verdicts: Mapping[str, Mapping[str, MinerVerdict]] = field(default_factory=dict)
    ballots: Mapping[str, SignedBallot] = field(default_factory=dict)

    def answered(self) -> tuple[str, ...]:
        """Return the validators that reported a loss on ``w_t``, in draw order."""
        return tuple(r.validator for r in self.reports if not math.isnan(r.baseline_loss))

    def with_later(self, later: CommitteeAnswers) -> CommitteeAnswers:
        """Return these answers completed by a later exchange's losses and problems.

        A later exchange asks only for what this one did not, so a loss it reports
        fills a NaN here and a loss it lacks keeps this one's.
        """
        by_validator = {report.validator: report for report in later.reports}
        merged = []
        for report in self.reports:
            more = by_validator.get(report.validator)
            if more is None:
                merged.append(report)
                continue
            losses = {
                name: loss
                if math.isnan(more.candidate_losses.get(name, math.nan))
                else more.candidate_losses[name]
                for name, loss in report.candidate_losses.items()
            }
            merged.append(
                replace(report, candidate_losses=losses, problems=report.problems + more.problems)
            )
        return replace(self, reports=tuple(merged))


@dataclass(frozen=True)
class _Sent:
    """What one message of the exchange asked: whom, and which models or candidates."""

    member: str
    models: tuple[str, ...]
    mining: tuple[str, ...] = ()
    duty: bool = False


def exchange_with_committee(
    grid: Grid,
    server_round: int,
    validators: Sequence[str],
    baseline: ArrayRecord,
    candidates: Mapping[str, ArrayRecord],
    settings: ValidationSettings,
    extra_config: Mapping[str, ConfigValue] | None = None,
    *,
    duty_nodes: Collection[str] = (),
    mining: Mapping[str, RecordDict] | None = None,
    miners: Sequence[str] = (),
    plain_models: Collection[str] | None = None,
) -> CommitteeAnswers:
    """Have the validators evaluate ``baseline`` and all ``candidates``, and the miners sign.

    Parameters
    ----------
    grid : Grid
        Where the messages go.
    server_round : int
        The current round.
    validators : Sequence[str]
        Node ids of the validators.
    baseline : ArrayRecord
        The current global model ``w_t``.
    candidates : Mapping[str, ArrayRecord]
        Candidate name -> model.
    settings : ValidationSettings
        Record names, loss key and timeout.
    extra_config : Mapping[str, ConfigValue], optional
        Further evaluate-config entries (CKKS mode's flag).
    duty_nodes : Collection[str]
        Members that run the bcsfl mod: each gets one committee duty message.
    mining : Mapping[str, RecordDict], optional
        Candidate name -> its mine request (:meth:`RoundNotary.mining_plan`).
    miners : Sequence[str]
        Miners that can sign (all in ``duty_nodes``).
    plain_models : Collection[str], optional
        The models (:data:`BASELINE_CANDIDATE` and candidate names) a validator outside
        ``duty_nodes`` is asked for, one ``evaluate`` message each; all by default. A
        duty node gets every model in its one message.

    Returns
    -------
    CommitteeAnswers
        Replies to unknown messages and repeated replies are ignored; missing or
        unusable losses are NaN, with the reason in the report's ``problems``.
    """
    models = {BASELINE_CANDIDATE: baseline, **candidates}
    messages, asked = _committee_messages(
        validators,
        models,
        server_round,
        extra_config or {},
        settings,
        set(map(str, duty_nodes)),
        mining or {},
        miners,
        models if plain_models is None else plain_models,
    )
    plain = len(models) if plain_models is None else len(set(models) & set(plain_models))
    log(
        INFO,
        "committee: %d validators x %d models (w_t + %d candidates; %d asked of one "
        "without the mod), %d miners, %d messages",
        len(validators),
        len(models),
        len(candidates),
        plain,
        len(miners),
        len(messages),
    )
    if not messages:
        return CommitteeAnswers(())
    replies = list(grid.send_and_receive(messages, timeout=settings.timeout))
    # Pushing gives each message its id, so what each one asked is keyed only now.
    sent = {
        message.metadata.message_id: entry for message, entry in zip(messages, asked, strict=True)
    }
    losses: dict[str, dict[str, float]] = {str(v): {} for v in validators}
    problems: dict[str, list[str]] = {str(v): [] for v in validators}
    verdicts: dict[str, dict[str, MinerVerdict]] = {name: {} for name in mining or {}}
    ballots: dict[str, SignedBallot] = {}
    expected: dict[str, set[str]] = {str(v): set() for v in validators}
    for entry in asked:
        expected.get(entry.member, set()).update(entry.models)
    for reply in replies:
        question = sent.pop(reply.metadata.reply_to_message_id, None)
        if question is None:
            log(WARNING, "committee: ignoring a reply to an unknown or answered message")
            continue
        if question.duty and question.models:
            ballot, problem = read_duty_ballot(reply)
            if ballot is not None:
                ballots[question.member] = ballot
            if problem is not None:
                problems[question.member].append(problem)
        for name in question.models:
            if question.duty:
                loss, problem = read_duty_loss(reply, name, settings.loss_metric_key)
            else:
                loss, problem = read_loss(reply, settings.loss_metric_key)
            if problem is not None:
                problems[question.member].append(f"{name}: {problem}")
            losses[question.member][name] = loss
        for name in question.mining:
            verdicts[name][question.member] = read_duty_verdict(reply, name)
    reports = _reports(validators, models, expected, losses, problems)
    return CommitteeAnswers(reports, verdicts, ballots)


def _committee_messages(
    validators: Sequence[str],
    models: Mapping[str, ArrayRecord],
    server_round: int,
    extra_config: Mapping[str, ConfigValue],
    settings: ValidationSettings,
    duty_nodes: Collection[str],
    mining: Mapping[str, RecordDict],
    miners: Sequence[str],
    plain_models: Collection[str],
) -> tuple[list[Message], list[_Sent]]:
    """Return the exchange's messages and, in the same order, what each one asks."""
    validator_ids, miner_ids = list(map(str, validators)), list(map(str, miners))
    messages: list[Message] = []
    asked: list[_Sent] = []
    for member in dict.fromkeys(validator_ids + miner_ids):
        evaluates = models if member in validator_ids else {}
        signs = mining if member in miner_ids else {}
        if member in duty_nodes:
            duty = CommitteeDuty(
                evaluates,
                {**extra_config, ROUND_KEY: server_round},
                signs,
                settings.arrayrecord_key,
                settings.configrecord_key,
                settings.loss_metric_key,
            )
            messages.append(
                Message(duty_content(duty), int(member), message_type=MessageType.EVALUATE)
            )
            asked.append(_Sent(member, tuple(evaluates), tuple(signs), duty=True))
            continue
        plain = {name: model for name, model in evaluates.items() if name in plain_models}
        for request in validation_requests(
            [member] if plain else [],
            plain,
            server_round,
            arrayrecord_key=settings.arrayrecord_key,
            configrecord_key=settings.configrecord_key,
            extra_config=extra_config,
        ):
            messages.append(request.message)
            asked.append(_Sent(member, (request.candidate,)))
    return messages, asked


def _reports(
    validators: Sequence[str],
    models: Mapping[str, ArrayRecord],
    expected: Mapping[str, Collection[str]],
    losses: Mapping[str, Mapping[str, float]],
    problems: Mapping[str, list[str]],
) -> tuple[ValidatorReport, ...]:
    """Return one report per validator: a model it was not asked for has a NaN loss."""
    reports = []
    for validator in map(str, validators):
        missing = [
            name for name in models if name in expected[validator] and name not in losses[validator]
        ]
        problems_here = list(problems[validator])
        if missing:
            problems_here.append(f"no reply for {missing}")
        reports.append(
            ValidatorReport(
                validator=validator,
                baseline_loss=losses[validator].get(BASELINE_CANDIDATE, math.nan),
                candidate_losses={
                    c: losses[validator].get(c, math.nan) for c in models if c != BASELINE_CANDIDATE
                },
                problems=tuple(problems_here),
            )
        )
    return tuple(reports)


def stated_ballots(
    statement: RoundStatement, answers: CommitteeAnswers
) -> tuple[dict[str, Any], ...]:
    """Return the ballots the statement records, in draw order.

    A validator that signs its replies is recorded by its signed ballot (none if it cast
    none: it abstains); one that cannot sign (an unsigned ``node:`` identity) by the
    losses it reported.
    """
    node_of = statement.node_of()
    reports = {report.validator: report for report in answers.reports}
    entries: list[dict[str, Any]] = []
    for identity in statement.validators:
        node = node_of[identity]
        if identity.startswith(UNSIGNED_PREFIX):
            entries.append(unsigned_ballot(identity, reports[node]))
        elif node in answers.ballots:
            entries.append(answers.ballots[node].to_fields())
    return tuple(entries)
