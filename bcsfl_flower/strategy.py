"""The BCSFL strategy: a drop-in replacement for Flower's ``FedAvg``.

This module holds only Flower's hooks. Each round is decided by
:class:`~bcsfl_flower.round.pipeline.RoundPipeline`, as Flower's ``MultiKrum`` hands its
selection to ``select_multikrum``: check every reply on its own, bound norms and example
counts, screen for the stake-majority cluster, draw a committee by stake, have the
validators score the trusted mean and its robust fallbacks, commit the best candidate
that reaches the 2/3 quorum (or roll back), have the miners certify it, anchor it, and
settle the stakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, replace
from logging import INFO
from operator import attrgetter
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from bcsfl_flower.prompt_grid import PromptGrid
from bcsfl_flower.protocol import all_refused_for_budget
from bcsfl_flower.round.metrics import aggregate_evaluate_metrics, round_metrics
from bcsfl_flower.round.notary import RoundNotary
from bcsfl_flower.round.pipeline import RoundPipeline
from bcsfl_flower.round.selection import selection_rule
from bcsfl_flower.round.settings import RoundSettings, SettingError
from bcsfl_flower.round.space import update_space
from bcsfl_flower.round.stakes import INITIAL_STAKES, StakeLedger
from bcsfl_flower.round.validation import ValidationSettings

RoundSink = Callable[[int, dict[str, Any]], None]
"""Receives ``(server_round, record)`` once per round, e.g. :meth:`RunRecorder.record`."""


class PrivacyBudgetExhaustedError(RuntimeError):
    """Every client of a round refused to train: the run would overspend ``dp-target-epsilon``."""


def _exposes_round_settings(cls: type[BCSFL]) -> type[BCSFL]:
    """Give ``cls`` one read-only attribute per :class:`RoundSettings` field.

    Generated from the dataclass, so a new setting needs no second definition here.
    """
    for setting in fields(RoundSettings):
        getter = attrgetter(f"_settings.{setting.name}")
        setattr(cls, setting.name, property(getter, doc=f"``settings.{setting.name}``."))
    return cls


@_exposes_round_settings
class BCSFL(FedAvg):
    """BCS-FL: stake-drawn committees, robust screening and 2/3-quorum consensus.

    A drop-in replacement for ``FedAvg``: it takes every ``FedAvg`` argument, works with
    any ClientApp that implements ``train`` and ``evaluate``, and is started the same
    way (``strategy.start(grid, initial_arrays, num_rounds, ...)``).

    Parameters
    ----------
    settings : RoundSettings, optional
        Selection, committee seats, stake rule, screening and validation settings; every
        default and every check lives there. Keyword arguments that name one of its
        fields (``num_validators=7``) are applied on top, so
        ``BCSFL(num_validators=7, fraction_train=0.5)`` works as with ``FedAvg``.
    initial_stakes : Mapping[str, float], optional
        Initial stakes keyed by client address (proved by its signed packet) or node id.
        Entries win over ``settings.initial_stake`` in every mode.
    notary : RoundNotary, optional
        Audit trail: verifies the clients' signed packets, gathers the miners' quorum
        certificate, stores every committed model and anchors every round on chain.
    start_round : int (default: 1)
        Number of the first round ``start`` runs: a resumed run continues after the
        last round its chain records (see :mod:`bcsfl_flower.audit.checkpoint`), and
        ``start(num_rounds=N)`` then runs rounds ``start_round..N``.
    round_sink : RoundSink, optional
        Called once per round with a JSON-serialisable record of the round.
    **keywords
        :class:`RoundSettings` fields, and every ``FedAvg`` argument
        (``fraction_train``, ``weighted_by_key``, ``arrayrecord_key``,
        ``train_metrics_aggr_fn``, ...).

    Attributes
    ----------
    settings : RoundSettings
        The validated settings; each field is also a read-only attribute
        (``strategy.num_validators``).
    """

    def __init__(
        self,
        settings: RoundSettings | None = None,
        *,
        initial_stakes: Mapping[str, float] | None = None,
        notary: RoundNotary | None = None,
        start_round: int = 1,
        round_sink: RoundSink | None = None,
        **keywords: Any,
    ) -> None:
        settings, fedavg_kwargs = (settings or RoundSettings()).split_keywords(keywords)
        super().__init__(**fedavg_kwargs)
        if isinstance(start_round, bool) or not isinstance(start_round, int) or start_round < 1:
            raise SettingError("start_round", f"must be an int >= 1, got {start_round!r}")
        self._settings = settings
        self.space = update_space("ckks" if settings.ckks else "plain")
        self.pipeline = RoundPipeline(
            settings,
            self.space,
            selection_rule(settings.selection, encrypted=settings.ckks),
            INITIAL_STAKES[settings.initial_stake](initial_stakes),
            self.train_metrics_aggr_fn,
            notary,
            validation=ValidationSettings.of(settings, self.arrayrecord_key, self.configrecord_key),
            weighted_by_key=self.weighted_by_key,
        )
        self.notary = notary
        self.start_round = start_round
        self.round_sink = round_sink
        self._global_arrays: ArrayRecord | None = None
        self._grid: Grid | None = None
        self._train_sent = 0.0

    @property
    def settings(self) -> RoundSettings:
        """The round settings, validated when the strategy was built."""
        return self._settings

    @property
    def ledger(self) -> StakeLedger:
        """The stake table, as the last settled round left it."""
        return self.pipeline.ledger

    def summary(self) -> None:
        """Log the strategy's configuration."""
        super().summary()
        settings = self._settings
        log(INFO, "\t└──> BCSFL (%s updates):", self.space.name)
        log(INFO, "\t\t├── Selection: %s", self.pipeline.selection.name)
        log(
            INFO,
            "\t\t├── Screening: norm outliers above %.2fx, split margin %.3f",
            settings.outlier_norm_ratio,
            settings.split_margin,
        )
        log(
            INFO,
            "\t\t├── Committee: %d validators (tolerance %.3f), %d miners",
            settings.num_validators,
            settings.vote_tolerance,
            settings.num_miners,
        )
        log(
            INFO,
            "\t\t└── Stakes: reward %.3f, slash %.0f%%",
            settings.stake_reward,
            100 * settings.stake_slash,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds ``start_round..num_rounds`` as ``FedAvg.start`` does, replies promptly.

        A BCSFL round exchanges messages three times (training, validation, mining),
        and Flower's ``send_and_receive`` waits 3 s between pulls, so the grid is
        wrapped in a :class:`~bcsfl_flower.prompt_grid.PromptGrid` that polls with a
        short, growing interval instead. Flower's loop numbers rounds from 1; a resumed
        run's rounds are renumbered on the way in and in the returned ``Result``.
        """
        offset = self.start_round - 1
        if offset >= num_rounds:
            raise ValueError(f"start_round {self.start_round} is past num_rounds {num_rounds}")
        if not isinstance(grid, PromptGrid):
            grid = PromptGrid(grid)
        runner = self if offset == 0 else ResumedBCSFL(self, offset)
        result = Strategy.start(
            runner,
            grid,
            initial_arrays,
            num_rounds=num_rounds - offset,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=None if evaluate_fn is None else _shifted(evaluate_fn, offset),
        )
        for history in (
            result.train_metrics_clientapp,
            result.evaluate_metrics_clientapp,
            result.evaluate_metrics_serverapp,
        ):
            shifted = {number + offset: metrics for number, metrics in history.items()}
            history.clear()
            history.update(shifted)
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does, remembering ``w_t`` and the grid.

        ``aggregate_train`` receives no Grid in Flower's Strategy API, but validation
        must message the committee before the round's model is decided, so the grid is
        kept from here.
        """
        self.space.prepare(grid, arrays, self._settings.committee_timeout)
        self._global_arrays = arrays
        self._grid = grid
        config.update(self.space.message_config())
        if self.notary is not None:
            config.update(self.notary.signing_config())
        messages = super().configure_train(server_round, arrays, config, grid)
        self._train_sent = time.perf_counter()  # Flower sends them as soon as we return
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does, with the update space's config entries."""
        config.update(self.space.message_config())
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decide the round: the committed candidate, or ``w_t`` itself on rollback."""
        if self._global_arrays is None or self._grid is None:
            raise RuntimeError("aggregate_train called before configure_train")
        training_s = time.perf_counter() - self._train_sent
        record = self.pipeline.run(server_round, self._grid, self._global_arrays, replies)
        if record.timing is not None:
            record = replace(record, timing=replace(record.timing, training_s=training_s))
        if self.round_sink is not None:
            self.round_sink(server_round, record.to_json())
        if not record.checked.accepted and all_refused_for_budget(record.checked.rejected.values()):
            raise PrivacyBudgetExhaustedError(
                f"round {server_round}: every client refused to train; "
                + next(iter(record.checked.rejected.values()))
            )
        return record.arrays, round_metrics(record)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate federated evaluation, leaving out replies that cannot be weighed.

        ``FedAvg`` exits the ServerApp when one evaluate reply has other metric keys;
        here such a reply is left out and logged.
        """
        contents = [reply.content for reply in replies if not reply.has_error()]
        return aggregate_evaluate_metrics(
            contents, self.weighted_by_key, self.evaluate_metrics_aggr_fn
        )


class ResumedBCSFL(Strategy):
    """A BCSFL strategy seen by Flower's round loop as starting at round 1.

    Flower's ``Strategy.start`` numbers rounds from 1; this view adds the rounds a
    resumed run already has, so that configs, records and the chain see the true round.
    """

    def __init__(self, strategy: BCSFL, offset: int) -> None:
        self.strategy = strategy
        self.offset = offset

    def summary(self) -> None:
        """Log the wrapped strategy's configuration and where it resumes."""
        self.strategy.summary()
        log(INFO, "\t\tResumed: continuing with round %d", self.offset + 1)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the true round ``server_round + offset``."""
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decide the true round ``server_round + offset``."""
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure federated evaluation of the true round."""
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate federated evaluation of the true round."""
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)


def _shifted(
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], offset: int
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Return ``evaluate_fn`` called with true round numbers."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return evaluate_fn(server_round + offset, arrays)

    return evaluate
