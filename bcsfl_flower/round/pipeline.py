"""One BCS-FL round as a straight pipeline of stages.

::

    replies -> check -> bound -> screen -> state statement -> draw committee
            -> validation (validators score every candidate and sign their ballots)
            -> decide (conclude the statement and its ballots) -> mining (miners
            recompute the decision and sign it) -> anchor or record the rollback
            -> settle stakes -> RoundRecord

Each stage is a pure function or a small object in its own module and returns a frozen
result (:mod:`bcsfl_flower.round.state`) that the next stage takes. The round has one
exit, :meth:`RoundPipeline._finish`, which anchors or records the rollback, settles the
stakes and writes the :class:`~bcsfl_flower.round.state.RoundRecord` once.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from bcsfl_flower.committee import Committee, draw_committee
from bcsfl_flower.packets import Eip712Domain, model_hash, to_hex
from bcsfl_flower.protocol import BASELINE_CANDIDATE, ROLLBACK_CANDIDATE, ConfigValue
from bcsfl_flower.round.bounds import weighted_median
from bcsfl_flower.round.checks import check_replies
from bcsfl_flower.round.conclusion import conclude, record_ballot_faults
from bcsfl_flower.round.metrics import MetricsAggregation, aggregate_client_metrics
from bcsfl_flower.round.noise_reference import (
    NOISE_REFERENCES,
    reference_rng,
    sampling_error_coefficients,
)
from bcsfl_flower.round.notary import RoundNotary
from bcsfl_flower.round.planning import plan_round
from bcsfl_flower.round.selection import SelectionRule
from bcsfl_flower.round.settings import RoundSettings
from bcsfl_flower.round.space import GramExchange, UpdateSpace
from bcsfl_flower.round.stakes import (
    InitialStake,
    StakeChanges,
    StakeLedger,
    settle,
    stake_changes,
)
from bcsfl_flower.round.state import (
    Bounds,
    CandidateSet,
    Certification,
    CheckedReplies,
    Contribution,
    Decision,
    GramResult,
    RoundRecord,
    Screening,
    UpdateBatch,
    ValidatorReport,
    rejected_clients,
)
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
from bcsfl_flower.round.timing import StageClock
from bcsfl_flower.round.validation import (
    CommitteeAnswers,
    ValidationSettings,
    exchange_with_committee,
    stated_ballots,
)


@dataclass(frozen=True)
class _Stages:
    """The results of the stages between check and decide (None where a stage did not run)."""

    decision: Decision
    statement: RoundStatement | None = None
    gram: GramResult | None = None
    bounds: Bounds | None = None
    screening: Screening | None = None
    committee: Committee | None = None
    candidates: CandidateSet | None = None
    reports: tuple[ValidatorReport, ...] = ()


class RoundPipeline:
    """Decide one round from its training replies.

    Parameters
    ----------
    settings : RoundSettings
        The round's configuration.
    space : UpdateSpace
        Plaintext or CKKS updates.
    selection : SelectionRule
        Which candidates are scored and how votes decide.
    initial_stake : InitialStake
        Stake of a client the ledger has not seen.
    metrics_aggregation : MetricsAggregation
        The strategy's ``train_metrics_aggr_fn``.
    notary : RoundNotary, optional
        Audit trail: packet checks, mining, anchoring.
    ledger : StakeLedger, optional
        The stake table (a new, empty one by default).
    validation : ValidationSettings
        How validators are asked and read (``settings`` plus FedAvg's record names).
    weighted_by_key : str
        MetricRecord key of the example count (FedAvg's ``weighted_by_key``).
    """

    def __init__(
        self,
        settings: RoundSettings,
        space: UpdateSpace[Any],
        selection: SelectionRule,
        initial_stake: InitialStake,
        metrics_aggregation: MetricsAggregation,
        notary: RoundNotary | None = None,
        ledger: StakeLedger | None = None,
        *,
        validation: ValidationSettings,
        weighted_by_key: str,
    ) -> None:
        self.settings = settings
        self.validation = validation
        self.weighted_by_key = weighted_by_key
        self.space = space
        self.selection = selection
        self.initial_stake = initial_stake
        self.metrics_aggregation = metrics_aggregation
        self.notary = notary
        self.ledger = ledger if ledger is not None else StakeLedger()
        self._node_of_address: dict[str, str] = {}

    def run(
        self, server_round: int, grid: Grid, global_arrays: ArrayRecord, replies: Iterable[Message]
    ) -> RoundRecord:
        """Check, bound, screen, validate and mine, decide, certify and settle one round."""
        clock = StageClock()
        replies = list(replies)
        checked = check_replies(
            replies,
            self.space.collector(global_arrays, len(replies)),
            self.weighted_by_key,
            server_round,
            None if self.notary is None else self.notary.check_packet,
        )
        previous_hash = model_hash(global_arrays)
        if checked.accepted:
            self._register(checked)
            stages = self._decide(server_round, grid, global_arrays, checked, previous_hash, clock)
        else:
            stages = _Stages(Decision.rollback("rollback: no valid reply"))
        if stages.statement is None:
            statement = self._statement(server_round, global_arrays, previous_hash, checked, None)
            stages = replace(stages, statement=statement)
        return self._finish(
            server_round, grid, global_arrays, checked, stages, previous_hash, clock
        )

    def _decide(
        self,
        server_round: int,
        grid: Grid,
        global_arrays: ArrayRecord,
        checked: CheckedReplies,
        previous_hash: bytes,
        clock: StageClock,
    ) -> _Stages:
        """Run the stages from the Gram matrix to the validators' decision."""
        names = checked.names
        stakes = self.ledger.as_dict()
        exchange = GramExchange(
            grid,
            server_round,
            lambda: (
                draw_committee(
                    stakes, names, self.settings.num_validators, 0, previous_hash, server_round
                ).validators
            ),
            self.validation.timeout,
        )
        gram = self.space.gram(checked.batch, exchange)
        if gram.matrix is None:
            return _Stages(Decision.rollback(f"rollback: {gram.reason}"), gram=gram)
        planned = plan_round(
            gram.matrix,
            np.array([c.num_examples for c in checked.accepted]),
            self.ledger.stakes_for(names),
            self.settings,
            self.selection,
            names,
        )
        bounds, screening, plan = planned.bounds, planned.screening, planned.candidates
        log(
            INFO,
            "screening: %d trusted, %d rejected by screening, %d by checks",
            len(screening.trusted),
            len(screening.rejected),
            len(checked.rejected),
        )
        statement = self._statement(server_round, global_arrays, previous_hash, checked, screening)
        drawn = redraw(statement)
        statement = replace(statement, validators=drawn.validators, miners=drawn.miners)
        committee = by_node(drawn, statement.node_of())
        candidates = CandidateSet(
            plan, self.space.combine(global_arrays, checked.batch, plan.coefficients)
        )
        scored = {
            **candidates.by_name(),
            **self._noise_references(
                global_arrays, checked.batch, bounds, screening, (previous_hash, server_round)
            ),
        }
        statement = replace(
            statement, plan=StatedPlan.of(plan, {n: model_hash(a) for n, a in scored.items()})
        )
        duty_nodes = {str(c.name) for c in checked.accepted if c.serves_duty}
        with clock.stage("committee"):
            answers, statement, decision, reports = self._score(
                grid,
                server_round,
                committee.validators,
                global_arrays,
                scored,
                statement,
                duty_nodes,
                self.selection.leading(plan),
            )
        # what went wrong in the exchange (no reply, a failed evaluation) stays on record
        exchanged = {report.validator: report.problems for report in answers.reports}
        reports = tuple(
            replace(r, problems=(*exchanged.get(r.validator, ()), *r.problems)) for r in reports
        )
        log(INFO, "consensus: %s", decision.reason)
        return _Stages(decision, statement, gram, bounds, screening, committee, candidates, reports)

    def _score(
        self,
        grid: Grid,
        server_round: int,
        validators: Sequence[str],
        global_arrays: ArrayRecord,
        scored: Mapping[str, ArrayRecord],
        statement: RoundStatement,
        duty_nodes: Collection[str],
        leading: Collection[str],
    ) -> tuple[CommitteeAnswers, RoundStatement, Decision, tuple[ValidatorReport, ...]]:
        """Have the validators score the candidates, and conclude from their ballots.

        A validator without the bcsfl mod pays one ``evaluate`` call per model, so it is
        first asked for ``w_t``, the rule's leading candidates and the noise references
        only; the others follow, from the validators that answered, when these alone
        commit none of the leading ones. Whenever they do, the rule's decision does not
        depend on the others' scores (:meth:`SelectionRule.leading`): an uncontested
        round costs a plain validator two evaluations, not five.
        """
        first = {BASELINE_CANDIDATE, *leading, *(set(scored) & set(NOISE_REFERENCES))}
        config = {**self.space.message_config(), **self._signing_config()}

        def ask(
            members: Sequence[str], models: Mapping[str, ArrayRecord], plain: Collection[str]
        ) -> CommitteeAnswers:
            return exchange_with_committee(
                grid,
                server_round,
                members,
                global_arrays,
                models,
                self.validation,
                config,
                duty_nodes=duty_nodes,
                plain_models=plain,
            )

        answers = ask(validators, scored, first)
        statement, decision, reports = self._concluded(statement, answers)
        rest = {name: model for name, model in scored.items() if name not in first}
        asked = [v for v in answers.answered() if v not in duty_nodes]
        if rest and asked and not (decision.committed and decision.candidate in first):
            answers = answers.with_later(ask(asked, rest, set(rest)))
            statement, decision, reports = self._concluded(statement, answers)
        return answers, statement, decision, reports

    def _concluded(
        self, statement: RoundStatement, answers: CommitteeAnswers
    ) -> tuple[RoundStatement, Decision, tuple[ValidatorReport, ...]]:
        """Return the statement with the committee's ballots, and the decision they make."""
        statement = replace(statement, ballots=stated_ballots(statement, answers))
        statement = record_ballot_faults(statement, self._domain())
        decision, reports = conclude(statement, self._domain())
        return statement, decision, reports

    def _domain(self) -> Eip712Domain | None:
        """Return the trail's signing domain (None without an audit trail)."""
        return None if self.notary is None else self.notary.trail.domain

    def _signing_config(self) -> dict[str, ConfigValue]:
        """Config entries that make validators sign their ballots (none without a trail)."""
        return {} if self.notary is None else self.notary.signing_config()

    def _noise_references(
        self,
        global_arrays: ArrayRecord,
        batch: UpdateBatch,
        bounds: Bounds,
        screening: Screening,
        reference: tuple[bytes, int],
    ) -> dict[str, ArrayRecord]:
        """Return ``w_t + r`` and ``w_t - r`` by name, or nothing when they are off.

        ``r`` is the trusted mean's sampling error (:mod:`~bcsfl_flower.round.
        noise_reference`); ``reference`` is the previous hash and the round, which seed
        the split.
        """
        if not self.settings.noisy_updates:
            return {}
        error = sampling_error_coefficients(
            screening.trusted, bounds.weights, bounds.clip, reference_rng(*reference)
        )
        models = self.space.combine(global_arrays, batch, np.stack([error, -error]))
        return dict(zip(NOISE_REFERENCES, models, strict=True))

    def _finish(
        self,
        server_round: int,
        grid: Grid,
        global_arrays: ArrayRecord,
        checked: CheckedReplies,
        stages: _Stages,
        previous_hash: bytes,
        clock: StageClock,
    ) -> RoundRecord:
        """Certify, anchor or record the rollback, settle the stakes: the round's one exit."""
        if stages.statement is not None:  # the rejected clients, by the decided support
            rejected = rejected_clients(checked, stages.screening, stages.decision)
            stages = replace(stages, statement=replace(stages.statement, rejected=rejected))
        decision, certification = stages.decision, None
        arrays = global_arrays
        if decision.committed and stages.candidates is not None and decision.candidate:
            arrays = stages.candidates.by_name()[decision.candidate]
            with clock.stage("committee"):
                certification = self._mine(grid, checked, stages, str(decision.candidate), arrays)
            if certification is not None and not certification.certified:
                decision = replace(
                    decision,
                    committed=False,
                    candidate=None,
                    reason="rollback: validators committed but the miners' quorum certificate "
                    f"failed ({len(certification.refusals)} refused)",
                    support=(),
                )
                arrays = global_arrays
        elif not decision.committed:
            with clock.stage("committee"):
                certification = self._mine(grid, checked, stages, ROLLBACK_CANDIDATE, None)
        with clock.stage("anchoring"):
            anchoring = self._anchor(server_round, checked, stages, arrays, decision, certification)
        if not decision.committed:
            log(WARNING, "round %d rolled back: %s", server_round, decision.reason)
        settlement = settle(
            self.ledger.as_dict(),
            self._stake_changes(checked, stages.screening, decision),
            self.settings.stake_policy,
        )
        self.ledger.apply(settlement)
        return RoundRecord(
            server_round=server_round,
            previous_hash=previous_hash,
            model_hash=model_hash(arrays),
            arrays=arrays,
            checked=checked,
            decision=decision,
            settlement=settlement,
            bounds=stages.bounds,
            gram=stages.gram,
            screening=stages.screening,
            committee=stages.committee,
            candidates=stages.candidates,
            reports=stages.reports,
            certification=certification,
            anchoring=anchoring,
            client_metrics=self._client_metrics(checked, stages.bounds, decision),
            timing=clock.times(),
            rejections=stages.statement.rejected if stages.statement is not None else {},
        )

    def _register(self, checked: CheckedReplies) -> None:
        """Give every client the ledger has not seen its stake.

        Node ids are not identities: a SuperNode that reconnects gets a new one. A
        signed client is known by its address, so a new node id signing for an address
        the ledger already holds takes over that address's stake (a slashed client
        cannot reset its stake by reconnecting); anyone else gets the initial stake.
        """
        counts = np.array([c.num_examples for c in checked.accepted])
        typical = weighted_median(counts, np.ones(counts.size))
        for contribution in checked.accepted:
            if contribution.name not in self.ledger:
                earlier = self._node_of_address.get(contribution.address or "")
                stake = (
                    self.ledger.stake(earlier)
                    if earlier is not None
                    else self.initial_stake(contribution, typical)
                )
                self.ledger.register(contribution.name, stake)
            if contribution.address is not None:
                self._node_of_address[contribution.address] = contribution.name

    def _statement(
        self,
        server_round: int,
        global_arrays: ArrayRecord,
        previous_hash: bytes,
        checked: CheckedReplies,
        screening: Screening | None,
    ) -> RoundStatement:
        """State what the round decides from (its committee is drawn from this statement).

        The stake table is keyed by identity (address, or ``node:<id>`` unsigned). The
        caller draws the committee with :func:`~bcsfl_flower.round.statement.redraw` of
        the statement itself, so an auditor recomputes it with the very same call.
        """
        address_of = {node: address for address, node in self._node_of_address.items()}
        stakes = {
            identity_of(node, address_of.get(node)): stake
            for node, stake in self.ledger.as_dict().items()
        }
        replies = tuple(
            StatedReply(
                node=c.name,
                identity=identity_of(c.name, c.address),
                num_examples=float(c.num_examples),
                update_hash=to_hex(self._update_hash(c)),
                packet=None if c.packet is None else packet_fields(c.packet),
            )
            for c in checked.accepted
        )
        stakes.update({r.identity: self.ledger.stake(r.node) for r in replies})
        pool = () if screening is None else screening.committee_pool
        set_apart = () if screening is None else screening.set_apart
        return RoundStatement(
            round=server_round,
            previous_hash=to_hex(previous_hash),
            settings=DecisionSettings.of(self.settings, self.selection.name, self.space.name),
            stakes=stakes,
            replies=replies,
            candidates=tuple(replies[row].identity for row in pool),
            set_apart=tuple(replies[row].identity for row in set_apart),
            sketch_seed=checked.batch.sketch_seed,
            model_keys=tuple(global_arrays.keys()),
        )

    @staticmethod
    def _update_hash(contribution: Contribution) -> bytes:
        """Return the hash of a reply's arrays: its verified packet's, or computed unsigned."""
        if contribution.packet is not None:
            return contribution.packet.packet.model_hash
        return model_hash(next(iter(contribution.content.array_records.values())))

    def _mine(
        self,
        grid: Grid,
        checked: CheckedReplies,
        stages: _Stages,
        outcome: str,
        arrays: ArrayRecord | None,
    ) -> Certification | None:
        """Have the miners recompute the decision and sign it; return their certificate.

        ``outcome`` is the committed candidate, or
        :data:`~bcsfl_flower.protocol.ROLLBACK_CANDIDATE`. None without a notary or a
        committee (a rollback is then certified by the operator).
        """
        if self.notary is None or stages.committee is None or stages.statement is None:
            return None
        duty_nodes = {str(c.name) for c in checked.accepted if c.serves_duty}
        support = stages.decision.support if arrays is not None else ()
        packets = [p for p in (checked.accepted[row].packet for row in support) if p is not None]
        plan = self.notary.mining_plan(
            stages.statement, outcome, arrays, packets, stages.committee.miners, duty_nodes
        )
        answers = exchange_with_committee(
            grid,
            stages.statement.round,
            (),
            arrays if arrays is not None else ArrayRecord(),
            {},
            self.validation,
            self._signing_config(),
            duty_nodes=duty_nodes,
            mining=plan.requests,
            miners=tuple(plan.signing),
        )
        return self.notary.certify(plan, outcome, answers.verdicts.get(outcome, {}))

    def _anchor(
        self,
        server_round: int,
        checked: CheckedReplies,
        stages: _Stages,
        arrays: ArrayRecord,
        decision: Decision,
        certification: Certification | None,
    ) -> dict[str, Any] | None:
        """Keep the round's statement, then anchor it or record its rollback on chain.

        With ``replayable-rounds`` the accepted updates and the votes are kept too.
        Returns None without a notary.
        """
        if self.notary is None:
            return None
        statement = stages.statement
        assert statement is not None  # every path through run() states the round
        self.notary.keep_round(
            statement, [next(iter(c.content.array_records.values())) for c in checked.accepted]
        )
        if decision.committed and certification is not None:
            return self.notary.anchor(arrays, certification)
        rollback = certification
        if stages.decision.committed:  # the miners refused the commit: their signed refusals
            refused = certification.refusal if certification is not None else None
            rollback = refused and Certification(True, "miners", certificate=refused)
        return self.notary.rollback(statement, rollback)

    @staticmethod
    def _stake_changes(
        checked: CheckedReplies, screening: Screening | None, decision: Decision
    ) -> StakeChanges:
        """Return whom the round rewards and slashes, by node id (:func:`stake_changes`).

        The screen's classes and the decision's rows, named; a round without a screen
        (no Gram matrix) slashes only the clients its checks rejected.
        """
        names = checked.names

        def named(rows: Iterable[int]) -> list[str]:
            return [names[row] for row in rows]

        if screening is None:
            return StakeChanges(slashed=tuple(sorted(checked.rejected)))
        return stake_changes(
            trusted=named(screening.trusted),
            set_apart=named(screening.set_apart),
            rejected=[*checked.rejected, *named(screening.rejected)],
            support=named(decision.support),
            suspects=named(decision.suspects),
            committed=decision.committed,
        )

    def _client_metrics(
        self, checked: CheckedReplies, bounds: Bounds | None, decision: Decision
    ) -> MetricRecord | None:
        """Aggregate the supporting clients' metrics with their credited example counts."""
        if bounds is None or not decision.support:
            return None
        rows = list(decision.support)
        return aggregate_client_metrics(
            [checked.accepted[row].content for row in rows],
            [min(checked.accepted[row].num_examples, bounds.example_cap) for row in rows],
            self.weighted_by_key,
            self.metrics_aggregation,
        )
