"""The BCSFL strategy: a drop-in replacement for Flower's ``FedAvg``.

One round (``aggregate_train``), after Flower has collected the training replies:

1. **Check** every reply on its own (:mod:`bcsfl_flower.replies`); a bad one is
   rejected with a reason and the round goes on.
2. **Screen** the updates ``d_k = w_k - w_t``: one Gram matrix gives all cosine
   similarities, and the largest cluster of the ``tau``-graph is trusted
   (:mod:`bcsfl_flower.screening`).
3. **Committee**: validators and miners are drawn by stake among the trusted
   clients, seeded by (hash of ``w_t``, round) so anyone can replay the draw
   (:mod:`bcsfl_flower.committee`).
4. **Validate**: the candidate(s) go to the validators as ordinary ``evaluate``
   messages (:mod:`bcsfl_flower.validation`); their loss deltas are votes.
5. **Consensus**: ``ceil(2M/3)`` votes commit the candidate, anything less rolls back
   to ``w_t`` (:mod:`bcsfl_flower.consensus`).
6. **Mine and anchor** (with a :class:`~bcsfl_flower.notary.RoundNotary`): miners sign
   the committed candidate, ``ceil(2N/3)`` approvals form the quorum certificate, and
   the round is anchored on chain; without a certificate the round rolls back.
7. **Stakes**: trusted clients are rewarded, rejected ones slashed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any, Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from bcsfl_flower.client.ckks_mod import CKKS_CONFIG_KEY
from bcsfl_flower.committee import Committee, StakeLedger, draw_committee
from bcsfl_flower.consensus import ConsensusDecision, tally_accepts, tally_votes
from bcsfl_flower.encrypted_round import (
    EncryptedReplyChecker,
    decrypt_gram_by_committee,
    encrypted_global,
    fetch_public_context,
    global_specs,
    screen_encrypted,
)
from bcsfl_flower.notary import RoundNotary
from bcsfl_flower.packets import SignedModelPacket, model_hash
from bcsfl_flower.privacy.ckks import from_array_record, is_encrypted_record, to_array_record
from bcsfl_flower.privacy.encrypted_screening import encrypted_gram
from bcsfl_flower.prompt_grid import PromptGrid
from bcsfl_flower.replies import AcceptedReply, ReplyChecker
from bcsfl_flower.screening import (
    CENTERINGS,
    accept_vote,
    best_candidate_vote,
    center_updates,
    cosine_similarity_matrix,
    flatten_updates,
    screen_updates,
)
from bcsfl_flower.validation import CommitteeValidation, ValidatorReport

Selection = Literal["trusted-mean", "paper"]
InitialStake = Literal["equal", "data-size", "explicit"]
RoundSink = Callable[[int, dict[str, Any]], None]
"""Receives ``(server_round, record)`` once per round, e.g. :meth:`RunRecorder.record`."""

TRUSTED_MEAN = "trusted-mean"
IDENTITY_METRIC_KEYS = frozenset({"partition-id"})
"""Reply metrics that identify a client rather than measure it: recorded per client,
never averaged."""
MAX_METRIC_KEYS = frozenset({"dp-epsilon"})
"""Reply metrics aggregated by their maximum: a federation's privacy guarantee is the
weakest client's, so the round reports the largest epsilon, not a mean."""
SELECTIONS = ("trusted-mean", "paper")
INITIAL_STAKES = ("equal", "data-size", "explicit")


@dataclass(frozen=True)
class RoundOutcome:
    """What a round decided: the next global model and everything behind it."""

    arrays: ArrayRecord
    committed: bool
    decision: ConsensusDecision
    committee: Committee | None
    trusted: tuple[int, ...]
    record: dict[str, Any]


# pylint: disable=too-many-instance-attributes
class BCSFL(FedAvg):
    """BCS-FL: stake-drawn committees, cosine screening and 2/3-quorum consensus.

    A drop-in replacement for ``FedAvg``: it takes every ``FedAvg`` argument, works with
    any ClientApp that implements ``train`` and ``evaluate``, and is started the same
    way (``strategy.start(grid, initial_arrays, num_rounds, ...)``).

    Parameters
    ----------
    selection : {"trusted-mean", "paper"} (default: "trusted-mean")
        ``"paper"``: every trusted local model is a candidate and each validator votes
        for the one with the largest loss delta; ``ceil(2M/3)`` identical votes commit
        it. ``"trusted-mean"``: the sample-weighted mean of the trusted cluster is the
        single candidate and a validator accepts it when ``dE >= -vote_tolerance``.
        The default uses every honest client's work; the paper's mode keeps one.
    cosine_threshold : float (default: 0.0)
        ``tau`` of the screening graph, applied to the similarities of the centred
        updates (see ``screening_centering``).
    screening_centering : {"median", "none"} (default: "median")
        ``"median"`` compares updates after subtracting their coordinate-wise median,
        which separates a coherent attacking minority from heterogeneous honest
        clients; ``"none"`` is the paper's raw cosine (use it with the paper's
        ``cosine_threshold=0.7`` on MNIST or 0.5 on CIFAR-10). See
        :func:`bcsfl_flower.screening.center_updates`.
    majority_fallback : bool (default: True)
        When no cluster at ``cosine_threshold`` holds a majority of the clients, lower
        the threshold to the highest value at which one does (never raise it), so the
        trusted cluster is always a majority when the updates allow one. ``False`` is
        the paper's fixed threshold.
    num_validators, num_miners : int (default: 5, 5)
        Committee seats, clamped to the number of trusted clients.
    initial_stake : {"equal", "data-size", "explicit"} (default: "equal")
        Stake a client gets when first seen: 1.0, its ``num-examples``, or its entry in
        ``initial_stakes`` (keyed by node id; clients not listed get 1.0).
    initial_stakes : Mapping[str, float], optional
        Explicit stakes for ``initial_stake="explicit"``.
    stake_reward, stake_slash : float (default: 0.1, 0.5)
        Added to each trusted client's stake / removed from each rejected client's
        stake after a round (floored at 0; a zero-stake client is never drawn).
    vote_tolerance : float (default: 0.05)
        Loss increase a validator tolerates in trusted-mean mode (absorbs evaluation
        noise on non-IID data).
    loss_metric_key : str (default: "eval_loss")
        Key of the loss in the validators' evaluate replies.
    committee_timeout : float (default: 600)
        Seconds to wait for the validators.
    ckks : bool (default: False)
        CKKS mode: clients running ``bcsfl_ckks_client_app`` send ``Enc(w_k - w_t)``
        and receive the encrypted global model; the server holds only the public
        context (fetched from a client at start), screens on the Gram matrix that a
        committee of key holders decrypts (2/3 identical answers), and aggregates
        ciphertexts. Needs ``selection="trusted-mean"`` and a centring the Gram can
        express (``"none"``); no central evaluation is possible.
    notary : RoundNotary, optional
        Audit trail: verifies the clients' signed packets, gathers the miners' quorum
        certificate, stores every committed model and anchors every round on chain.
        Without it the round logic is the same but nothing is anchored.
    round_sink : RoundSink, optional
        Called once per round with a JSON-serialisable record (committee, trusted and
        rejected clients with reasons, votes, outcome, stakes, anchoring).
    **fedavg_kwargs
        Every ``FedAvg`` argument (``fraction_train``, ``min_train_nodes``, ...).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        *,
        selection: Selection = "trusted-mean",
        cosine_threshold: float = 0.0,
        screening_centering: str = "median",
        majority_fallback: bool = True,
        num_validators: int = 5,
        num_miners: int = 5,
        initial_stake: InitialStake = "equal",
        initial_stakes: Mapping[str, float] | None = None,
        stake_reward: float = 0.1,
        stake_slash: float = 0.5,
        vote_tolerance: float = 0.05,
        loss_metric_key: str = "eval_loss",
        committee_timeout: float = 600.0,
        ckks: bool = False,
        notary: RoundNotary | None = None,
        round_sink: RoundSink | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if initial_stake not in INITIAL_STAKES:
            raise ValueError(
                f"initial_stake must be one of {INITIAL_STAKES}, got {initial_stake!r}"
            )
        if ckks and selection == "paper":
            raise ValueError(
                "selection='paper' cannot run with CKKS: validators would have to decrypt "
                "individual clients' models; use selection='trusted-mean'"
            )
        if ckks and screening_centering == "median":
            raise ValueError(
                "screening_centering='median' cannot run with CKKS: the median needs the "
                "plaintext updates; use 'none' (screening then works on the Gram matrix)"
            )
        if screening_centering not in CENTERINGS:
            raise ValueError(
                f"screening_centering must be one of {CENTERINGS}, got {screening_centering!r}"
            )
        if not -1.0 <= cosine_threshold <= 1.0:
            raise ValueError(f"cosine_threshold must be in [-1, 1], got {cosine_threshold}")
        if num_validators < 1 or num_miners < 1:
            raise ValueError("num_validators and num_miners must be >= 1")
        if stake_reward < 0 or stake_slash < 0 or vote_tolerance < 0:
            raise ValueError("stake_reward, stake_slash and vote_tolerance must be >= 0")
        self.selection = selection
        self.cosine_threshold = cosine_threshold
        self.screening_centering = screening_centering
        self.majority_fallback = majority_fallback
        self.num_validators = num_validators
        self.num_miners = num_miners
        self.initial_stake = initial_stake
        self.initial_stakes = dict(initial_stakes or {})
        self.stake_reward = stake_reward
        self.stake_slash = stake_slash
        self.vote_tolerance = vote_tolerance
        self.ckks = ckks
        self.committee_timeout = committee_timeout
        self._public_context: Any = None
        self._specs: Any = None
        self.notary = notary
        self.round_sink = round_sink
        self.validation = CommitteeValidation(loss_metric_key, committee_timeout)
        self.ledger = StakeLedger()
        self._global_arrays: ArrayRecord | None = None
        self._grid: Grid | None = None

    def summary(self) -> None:
        """Log the strategy's configuration."""
        super().summary()
        log(INFO, "\t└──> BCSFL:")
        log(
            INFO, "\t\t├── Selection: %s (vote tolerance %.3f)", self.selection, self.vote_tolerance
        )
        log(
            INFO,
            "\t\t├── Screening: tau %.2f on %s-centred updates",
            self.cosine_threshold,
            self.screening_centering,
        )
        log(
            INFO,
            "\t\t├── Committee: %d validators, %d miners",
            self.num_validators,
            self.num_miners,
        )
        log(
            INFO,
            "\t\t└── Stakes: %s initial, reward %.3f, slash %.3f",
            self.initial_stake,
            self.stake_reward,
            self.stake_slash,
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
        """Run the rounds as ``FedAvg.start`` does, collecting replies promptly.

        A BCSFL round exchanges messages three times (training, validation, mining),
        and Flower's ``send_and_receive`` waits 3 s between pulls, so the grid is
        wrapped in a :class:`~bcsfl_flower.prompt_grid.PromptGrid` that polls with a
        short, growing interval instead.
        """
        if not isinstance(grid, PromptGrid):
            grid = PromptGrid(grid)
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does, remembering ``w_t`` and the grid.

        ``aggregate_train`` receives no Grid in Flower's Strategy API, but validation
        must message the committee before the round's model is decided, so the grid
        is kept from here.
        """
        self._global_arrays = arrays
        self._grid = grid
        if self.notary is not None:
            for key, value in self.notary.signing_config().items():
                config[key] = value
        if self.ckks:
            config[CKKS_CONFIG_KEY] = True
            if self._public_context is None:
                self._start_ckks(arrays, grid)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients as FedAvg does; in CKKS mode, tell their mod to decrypt."""
        if self.ckks:
            config[CKKS_CONFIG_KEY] = True
        return super().configure_evaluate(server_round, arrays, config, grid)

    def _start_ckks(self, initial_arrays: ArrayRecord, grid: Grid) -> None:
        """Fetch the public context from a client and fix the model's layout."""
        if is_encrypted_record(initial_arrays):
            raise ValueError("CKKS mode starts from a plaintext initial model")
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise RuntimeError("CKKS mode: no node to fetch the public context from")
        self._public_context = fetch_public_context(grid, node_ids[0], self.committee_timeout)
        self._specs = global_specs(initial_arrays)
        log(INFO, "CKKS: public context fetched from node %s (no secret key)", node_ids[0])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Run checks, screening, committee validation and consensus on the replies.

        Returns the committed candidate, or ``w_t`` itself on rollback, and a
        MetricRecord with the round's numeric outcome.
        """
        if self._global_arrays is None or self._grid is None:
            raise RuntimeError("aggregate_train called before configure_train")
        outcome = self.decide_round(server_round, self._grid, self._global_arrays, replies)
        self._emit(server_round, outcome.record)
        return outcome.arrays, self._round_metrics(outcome)

    def decide_round(
        self,
        server_round: int,
        grid: Grid,
        global_arrays: ArrayRecord,
        replies: Iterable[Message],
    ) -> RoundOutcome:
        """Decide the next global model from one round's training replies."""
        if self.ckks:
            checker: Any = EncryptedReplyChecker(
                self._specs, self._public_context, self.weighted_by_key
            )
        else:
            checker = ReplyChecker(global_arrays, self.weighted_by_key)
        accepted, rejected = checker.split(replies)
        record: dict[str, Any] = {
            "clients": {str(r.node_id): _scalar_metrics(r.metrics) for r in accepted},
            "rejected": {str(r.node_id): r.reason for r in rejected},
        }
        packets = self._check_packets(server_round, accepted, record)
        accepted = [r for r in accepted if str(r.node_id) not in record["rejected"]]
        for reply in accepted:
            self._register(reply)
        previous_hash = model_hash(global_arrays)
        record["previous_hash"] = "0x" + previous_hash.hex()

        if not accepted:
            decision = ConsensusDecision(False, None, 0, 0, 0, "rollback: no valid reply")
            return self._finish(server_round, global_arrays, decision, None, (), accepted, record)

        if self.ckks:
            similarity = self._encrypted_similarity(
                grid, server_round, accepted, previous_hash, record
            )
            if similarity is None:
                decision = ConsensusDecision(
                    False, None, 0, 0, 0, f"rollback: {record['gram']['reason']}"
                )
                return self._finish(
                    server_round, global_arrays, decision, None, (), accepted, record
                )
        else:
            similarity = cosine_similarity_matrix(
                center_updates(
                    flatten_updates(
                        [list(_numpy(r.arrays).values()) for r in accepted],
                        list(_numpy(global_arrays).values()),
                    ),
                    self.screening_centering,
                )
            )
        screening = screen_updates(
            similarity,
            self.cosine_threshold,
            self.ledger.stakes_for([str(r.node_id) for r in accepted]),
            majority_fallback=self.majority_fallback,
        )
        for index in screening.rejected:
            record["rejected"][str(accepted[index].node_id)] = screening.reasons[index]
        trusted = [accepted[i] for i in screening.trusted]
        record["trusted"] = sorted(str(r.node_id) for r in trusted)
        log(
            INFO,
            "screening: %d trusted, %d rejected by cosine (tau=%.2f), %d by checks",
            len(trusted),
            len(screening.rejected),
            self.cosine_threshold,
            len(rejected),
        )

        committee = draw_committee(
            self.ledger,
            [str(r.node_id) for r in trusted],
            self.num_validators,
            self.num_miners,
            previous_hash,
            server_round,
        )
        record["committee"] = committee.to_dict()
        candidates = self._candidates(trusted, global_arrays)
        reports = self.validation.evaluate(
            grid,
            server_round,
            committee.validators,
            global_arrays,
            candidates,
            {CKKS_CONFIG_KEY: True} if self.ckks else None,
        )
        decision, votes = self._vote(reports, list(candidates), len(committee.validators))
        record["votes"] = votes
        record["validator_problems"] = {
            r.validator: list(r.problems) for r in reports if r.problems
        }
        log(INFO, "consensus: %s", decision.reason)
        if decision.committed and self.notary is not None:
            certification = self.notary.certify(
                grid,
                server_round,
                candidates[decision.candidate],
                [packets[str(r.node_id)] for r in trusted if str(r.node_id) in packets],
                committee.miners,
            )
            record["mining"] = {
                "certified_by": certification.certified_by,
                "refusals": certification.refusals,
            }
            if certification.certificate is None:
                decision = replace(
                    decision,
                    committed=False,
                    candidate=None,
                    reason=f"rollback: validators committed but the miners' quorum "
                    f"certificate failed ({len(certification.refusals)} refused)",
                )
            else:
                record["chain"] = self.notary.anchor(candidates[decision.candidate], certification)
        new_arrays = candidates[decision.candidate] if decision.committed else global_arrays
        return self._finish(
            server_round,
            new_arrays,
            decision,
            committee,
            tuple(r.node_id for r in trusted),
            accepted,
            record,
        )

    def _check_packets(
        self, server_round: int, accepted: list[AcceptedReply], record: dict[str, Any]
    ) -> dict[str, SignedModelPacket]:
        """Verify signed packets; a reply with a bad packet joins the rejected."""
        if self.notary is None:
            return {}
        packets = {}
        for reply in accepted:
            check = self.notary.check_packet(reply.node_id, reply.message.content, server_round)
            if check.rejection is not None:
                log(WARNING, "Rejected reply from node %s: %s", reply.node_id, check.rejection)
                record["rejected"][str(reply.node_id)] = check.rejection
            elif check.packet is not None:
                packets[str(reply.node_id)] = check.packet
        record["signed"] = sorted(packets)
        return packets

    def _encrypted_similarity(
        self,
        grid: Grid,
        server_round: int,
        accepted: list[Any],
        previous_hash: bytes,
        record: dict[str, Any],
    ) -> np.ndarray | None:
        """Cosine matrix of encrypted updates, from a Gram that key holders decrypt.

        The server computes all inner products homomorphically; a committee drawn by
        stake among this round's accepted clients decrypts only that packed Gram, and
        the matrix that ``ceil(2m/3)`` of them return identically is used.
        """
        gram_committee = draw_committee(
            self.ledger,
            [str(r.node_id) for r in accepted],
            self.num_validators,
            0,
            previous_hash,
            server_round,
        )
        gram, gram_record = decrypt_gram_by_committee(
            grid,
            [int(n) for n in gram_committee.validators],
            encrypted_gram([r.model for r in accepted]),
            self.committee_timeout,
            server_round=server_round,
        )
        record["gram"] = gram_record
        if gram is None:
            return None
        cosine, _ = screen_encrypted(gram, "none")
        return cosine

    def _candidates(
        self, trusted: list[AcceptedReply], global_arrays: ArrayRecord
    ) -> dict[str, ArrayRecord]:
        if self.ckks:
            previous: Any = (
                from_array_record(global_arrays, self._public_context)
                if is_encrypted_record(global_arrays)
                else global_arrays
            )
            aggregate = encrypted_global(
                previous, [r.model for r in trusted], [r.num_examples for r in trusted]
            )
            return {TRUSTED_MEAN: to_array_record(aggregate)}
        if self.selection == "paper":
            return {str(r.node_id): r.arrays for r in trusted}
        merged = aggregate_arrayrecords(
            [RecordDict({"arrays": r.arrays, "metrics": r.metrics}) for r in trusted],
            self.weighted_by_key,
        )
        return {TRUSTED_MEAN: merged}

    def _vote(
        self, reports: list[ValidatorReport], candidate_ids: list[str], num_validators: int
    ) -> tuple[ConsensusDecision, dict[str, Any]]:
        if self.selection == "paper":
            ballots = {
                r.validator: best_candidate_vote(candidate_ids, r.deltas(candidate_ids))
                for r in reports
            }
            return tally_votes(ballots, num_validators), ballots
        accepts = {}
        for report in reports:
            delta = float(report.deltas(candidate_ids)[0])
            if not math.isnan(delta):  # a validator that could not evaluate abstains
                accepts[report.validator] = accept_vote(delta, self.vote_tolerance)
        votes = {
            r.validator: {
                "accept": accepts.get(r.validator),
                "delta": _finite_or_none(float(r.deltas(candidate_ids)[0])),
            }
            for r in reports
        }
        return tally_accepts(accepts, num_validators, candidate=TRUSTED_MEAN), votes

    # pylint: disable=too-many-arguments
    def _finish(
        self,
        server_round: int,
        arrays: ArrayRecord,
        decision: ConsensusDecision,
        committee: Committee | None,
        trusted: tuple[int, ...],
        accepted: list[AcceptedReply],
        record: dict[str, Any],
    ) -> RoundOutcome:
        trusted_ids = [str(n) for n in trusted]
        rejected_ids = [n for n in record["rejected"] if n in self.ledger]
        self.ledger.reward(trusted_ids, self.stake_reward)
        self.ledger.slash(rejected_ids, self.stake_slash)
        if not decision.committed and self.notary is not None:
            record["chain"] = self.notary.rollback(server_round, decision.reason)
        if not decision.committed:
            log(
                WARNING,
                "round %d rolled back to the previous global model: %s",
                server_round,
                decision.reason,
            )
        for key in MAX_METRIC_KEYS:
            values = [c[key] for c in record["clients"].values() if key in c]
            if values:
                record[f"max_{key.replace('-', '_')}"] = max(values)
        record.update(
            {
                "outcome": "commit" if decision.committed else "rollback",
                "reason": decision.reason,
                "candidate": decision.candidate,
                "votes_for": decision.votes_for,
                "quorum": decision.quorum,
                "model_hash": "0x" + model_hash(arrays).hex(),
                "stakes": self.ledger.as_dict(),
            }
        )
        return RoundOutcome(arrays, decision.committed, decision, committee, trusted, record)

    def _round_metrics(self, outcome: RoundOutcome) -> MetricRecord:
        record = outcome.record
        metrics = MetricRecord(
            {
                "committed": int(outcome.committed),
                "num-trusted": len(outcome.trusted),
                "num-rejected": len(record["rejected"]),
                "votes-for": outcome.decision.votes_for,
                "quorum": outcome.decision.quorum,
            }
        )
        trusted = [str(n) for n in outcome.trusted]
        numeric = [record["clients"][n] for n in trusted if n in record["clients"]]
        weights = [float(m.get(self.weighted_by_key, 0.0)) for m in numeric]
        if numeric and sum(weights) > 0:
            common = set.intersection(*(set(m) for m in numeric))
            for key in sorted(common - {self.weighted_by_key} - IDENTITY_METRIC_KEYS):
                values = [m[key] for m in numeric]
                if key in MAX_METRIC_KEYS:
                    metrics[f"max-{key}"] = float(max(values))
                else:
                    metrics[key] = float(np.average(values, weights=weights))
        return metrics

    def _register(self, reply: AcceptedReply) -> None:
        node = str(reply.node_id)
        if node in self.ledger:
            return
        if self.initial_stake == "data-size":
            stake = reply.num_examples
        elif self.initial_stake == "explicit":
            stake = float(self.initial_stakes.get(node, 1.0))
        else:
            stake = 1.0
        self.ledger.register(node, stake)

    def _emit(self, server_round: int, record: dict[str, Any]) -> None:
        if self.round_sink is not None:
            self.round_sink(server_round, record)


def _numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Arrays of a record in sorted key order (the order updates are flattened in)."""
    return {key: arrays[key].numpy() for key in sorted(arrays.keys())}


def _scalar_metrics(metrics: MetricRecord) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
