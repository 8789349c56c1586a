"""Replay one round from the trail: recompute its decision and compare it with the chain.

``bcsfl audit replay ROUND`` takes nothing from the ServerApp's memory. From the model
store it loads the round's state statement (checked against the anchored ``stateRoot``),
the model the round started from, and every accepted update (checked against its hash
and its client's signed packet). It then runs the round's own stages again, the same
functions the ServerApp ran:

    checks -> bounds -> screening -> committee draw -> candidates -> decision

and compares each result with what the round recorded: the trusted clients with the
statement's draw candidates, the committee with the statement's, the candidates and the
hash of every scored model with the statement's plan (what the ballots' hashes mean),
the decision (:func:`~bcsfl_flower.round.conclusion.conclude` of the statement's signed
ballots) and its committed model and supporters' packet root with the anchored ones (or
a rollback with a rollback). The first difference is reported.

Only plaintext rounds can be replayed: a CKKS round's updates are ciphertexts that only
the committee can decrypt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from bcsfl_flower.audit.verification import load_statement, timeline
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.certificates import AnchoredRound, RolledBackRound
from bcsfl_flower.chain.model_store import ModelIntegrityError, ModelStore
from bcsfl_flower.packets import Eip712Domain, accepted_root, model_hash, to_hex
from bcsfl_flower.round.conclusion import conclude
from bcsfl_flower.round.plain import PlainBatch, PlainCollector, PlainSpace
from bcsfl_flower.round.planning import plan_round
from bcsfl_flower.round.selection import selection_rule
from bcsfl_flower.round.statement import (
    RoundStatement,
    StatedReply,
    by_node,
    packet_fault,
    recorded_draw,
    signed_packet,
)


class ReplayMismatchError(Exception):
    """The replayed round differs from the recorded one (the message says where)."""


@dataclass(frozen=True)
class ReplayResult:
    """What a replay recomputed.

    Attributes
    ----------
    round : int
        The replayed round.
    committed : bool
        Whether the replayed decision commits a candidate.
    model_hash : bytes
        The replayed round's model: the committed candidate's, or ``w_t`` on rollback.
    reason : str
        The replayed decision's reason.
    """

    round: int
    committed: bool
    model_hash: bytes
    reason: str


def replay_round(trail: AuditTrail, manifest: ChainManifest, round_number: int) -> ReplayResult:
    """Recompute ``round_number`` from the stored round and compare it with the chain.

    Raises
    ------
    ReplayMismatchError
        At the first difference, or when an input the replay needs is missing or was
        modified.
    """
    record = _record_of(trail, round_number)
    root = record.approval.state_root if isinstance(record, AnchoredRound) else record.state_root
    store = ModelStore(manifest.models_dir)
    try:
        statement = load_statement(store, round_number, root)
    except ValueError as err:
        raise ReplayMismatchError(str(err)) from err
    if statement.settings.space != PlainSpace.name:
        raise ReplayMismatchError(
            f"round {round_number} ran in the {statement.settings.space!r} update space; "
            "only plaintext rounds can be replayed"
        )
    result = _recompute(statement, store, trail.domain)
    _compare(record, result, trail.domain, manifest.operator)
    return result.outcome


@dataclass(frozen=True)
class _Recomputed:
    outcome: ReplayResult
    supporters: tuple[StatedReply, ...]


def _record_of(trail: AuditTrail, round_number: int) -> AnchoredRound | RolledBackRound:
    for record in timeline(trail):
        if record.round == round_number:
            return record
    raise ReplayMismatchError(f"round {round_number} is not on chain")


def _recompute(statement: RoundStatement, store: ModelStore, domain: Eip712Domain) -> _Recomputed:
    """Run the round's stages again on the stored inputs."""
    label = f"round {statement.round}"
    start = _load_model(store, statement.previous_hash, statement.model_keys, "w_t")
    if not statement.replies:
        return _Recomputed(
            ReplayResult(statement.round, False, model_hash(start), "no valid reply"), ()
        )
    batch = _checked_batch(statement, store, start, domain)
    gram = PlainSpace().gram(batch, None)  # type: ignore[arg-type]  # plaintext needs no exchange
    assert gram.matrix is not None
    settings = statement.settings
    names = [reply.node for reply in statement.replies]
    planned = plan_round(
        gram.matrix,
        np.array([reply.num_examples for reply in statement.replies]),
        np.array([statement.stakes[reply.identity] for reply in statement.replies]),
        settings,
        selection_rule(settings.selection),
        names,
    )
    screening, plan = planned.screening, planned.candidates
    pool = tuple(statement.replies[row].identity for row in screening.committee_pool)
    _expect(
        pool == statement.candidates,
        f"{label}: screening keeps {list(pool)} for the committee, the round drew it from "
        f"{list(statement.candidates)}",
    )
    drawn, problem = recorded_draw(statement)
    _expect(problem is None, problem or "")
    node_of = statement.node_of()
    committee = by_node(drawn, node_of)
    models = dict(
        zip(plan.names, PlainSpace().combine(start, batch, plan.coefficients), strict=True)
    )
    _expect_plan(statement, plan.names, {name: model_hash(m) for name, m in models.items()})
    _expect(
        list(committee.validators) == [node_of[v] for v in statement.validators],
        f"{label}: the validators are not the drawn ones",
    )
    try:
        decision, _ = conclude(statement, domain)
    except (KeyError, TypeError, ValueError) as err:
        raise ReplayMismatchError(f"{label}: its decision cannot be recomputed: {err!r}") from err
    if not decision.committed or decision.candidate is None:
        outcome = ReplayResult(statement.round, False, model_hash(start), decision.reason)
        return _Recomputed(outcome, ())
    support = plan.supports[plan.names.index(decision.candidate)]
    outcome = ReplayResult(
        statement.round, True, model_hash(models[decision.candidate]), decision.reason
    )
    return _Recomputed(outcome, tuple(statement.replies[row] for row in support))


def _expect_plan(statement: RoundStatement, names: Sequence[str], hashes: dict[str, bytes]) -> None:
    """Check that the statement's plan names the replayed candidates and their hashes."""
    label = f"round {statement.round}"
    stated = statement.plan
    _expect(
        stated is not None and tuple(stated.names) == tuple(names),
        f"{label}: replay builds candidates {list(names)}, the statement lists "
        f"{None if stated is None else list(stated.names)}",
    )
    assert stated is not None
    for name, digest in hashes.items():
        _expect(
            stated.scored.get(name) == to_hex(digest),
            f"{label}: candidate {name} replays to 0x{digest.hex()}, the statement's ballots "
            f"scored {stated.scored.get(name)}",
        )


def _checked_batch(
    statement: RoundStatement, store: ModelStore, start: ArrayRecord, domain: Eip712Domain
) -> PlainBatch:
    """Load and check every accepted update, as the round's check stage did."""
    collector = PlainCollector(start, len(statement.replies), statement.sketch_seed)
    for index, reply in enumerate(statement.replies):
        label = f"round {statement.round}, reply {index} (node {reply.node})"
        arrays = _load_model(store, reply.update_hash, statement.model_keys, label)
        fault = packet_fault(reply, statement.round, domain)
        _expect(fault is None, f"{label}: {fault}")
        fault = collector.add(arrays)
        _expect(fault is None, f"{label}: the round accepted it, but the check fails: {fault}")
    return collector.finish()


def _load_model(store: ModelStore, digest: str, keys: Sequence[str], label: str) -> ArrayRecord:
    """Load a stored model in the round's key order (replay's sums then match bit for bit).

    A name that is not a model hash (a path, say) is a mismatch like a missing file.
    """
    try:
        arrays = store.load(digest)
    except (FileNotFoundError, ModelIntegrityError, ValueError) as err:
        raise ReplayMismatchError(f"{label}: {err}") from err
    ordered = [key for key in keys if key in arrays] + sorted(set(arrays) - set(keys))
    return ArrayRecord({key: Array(arrays[key]) for key in ordered})


def _compare(
    record: AnchoredRound | RolledBackRound,
    result: _Recomputed,
    domain: Eip712Domain,
    operator: str,
) -> None:
    """Compare the replayed decision with what the chain recorded."""
    label = f"round {record.round}"
    outcome = result.outcome
    if isinstance(record, RolledBackRound):
        # Validators may commit a candidate that a quorum of its miners then refuses:
        # they sign the rollback. The operator's word alone (or the unsigned reason) is
        # no such record.
        _expect(
            not outcome.committed or list(record.committee) != [operator],
            f"{label}: replay commits 0x{outcome.model_hash.hex()} ({outcome.reason}), the "
            f"operator alone records a rollback ({record.reason})",
        )
        return
    _expect(
        outcome.committed,
        f"{label}: replay rolls back ({outcome.reason}), the chain anchors "
        f"0x{record.model_hash.hex()}",
    )
    _expect(
        outcome.model_hash == record.model_hash,
        f"{label}: replay commits 0x{outcome.model_hash.hex()}, the chain anchors "
        f"0x{record.model_hash.hex()}",
    )
    packets = [signed_packet(r.packet) for r in result.supporters if r.packet is not None]
    _expect(
        accepted_root(packets, domain) == record.approval.accepted_root,
        f"{label}: the committed candidate's supporters do not hash to the anchored "
        f"accepted root 0x{record.approval.accepted_root.hex()}",
    )


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ReplayMismatchError(message)
