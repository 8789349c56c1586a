"""Verify a run's audit trail: the round sequence, hash links, certificates and stored models.

``bcsfl audit verify`` prints the report; resuming a stopped run refuses a trail that
does not verify, naming the first broken round. The checks:

* the contract's genesis is the manifest's, and the trail reaches at least the round
  and head the manifest recorded (unless the caller accepts a shorter chain, as a resume
  after a chain crash must: the lost rounds are then run again);
* rounds 1..latest appear exactly once each, anchored or rolled back;
* each anchored round links to the previous anchor, and each rollback keeps the last
  anchored model;
* every round's certificate (a commit's or a rollback's) has a committee that is sorted
  and hashes to its committee root, and signatures that recover, in this run, to a
  quorum of distinct members of that committee, each registered when the round was
  recorded, or the operator alone (for a commit only where the contract was deployed
  with ``operatorCertifies``);
* every round's state statement is in the store and hashes to the recorded
  ``stateRoot``; its committee is the stake-weighted draw recomputed from (previous
  model hash, round, stakes), and a round's certifying committee is exactly the drawn
  miners that sign (or the operator alone: for a commit when no drawn miner signs, for a
  rollback whenever too few miners did);
* every round's decision, recomputed from its statement's signed ballots
  (:func:`~bcsfl_flower.round.conclusion.conclude`, the function the round itself and
  its miners ran), is what the chain records: an anchored round commits the model the
  ballots carry to the quorum; a rollback is a round they carry nothing in, or one whose
  commit a quorum of the drawn miners refused, each signing the rollback (the operator's
  rollback of a round the ballots commit is reported as withheld: the chain's reason
  text is not signed, and proves nothing);
* every round's stake table is the one the round before it settled, re-derived from
  that round's statement and outcome (:mod:`~bcsfl_flower.round.settlement`): a
  participant of both has the same stake, to the bit;
* ``results.json``, where the run directory has one, agrees with the trail on every
  figure the trail holds (:class:`~bcsfl_flower.audit.run_results.RunResults`: each
  round's outcome, model, rejected clients and the stakes its statement was drawn
  from); its other figures (accuracy, client metrics) are the operator's word, and
  ``bcsfl audit show`` labels them so;
* every anchored model (and the genesis) is in the model store and re-hashes correctly,
  and the last one is the contract's head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from eth_utils import is_address

from bcsfl_flower.approvals import (
    committee_root,
    sort_committee,
)
from bcsfl_flower.audit.run_directory import (
    deployment_record_problems,
    symbolic_links,
    unaccounted_files,
)
from bcsfl_flower.audit.run_results import RESULTS_FILE, RunResults
from bcsfl_flower.chain.audit import AuditTrail, ChainManifest
from bcsfl_flower.chain.certificates import AnchoredRound, RolledBackRound, quorum
from bcsfl_flower.chain.model_store import ModelIntegrityError, ModelStore
from bcsfl_flower.packets import (
    Eip712Domain,
    to_hex,
)
from bcsfl_flower.round.conclusion import (
    conclude,
    false_ballot_records,
    stated_rollback_reason,
)
from bcsfl_flower.round.settlement import NodeIdentities, stated_settlement
from bcsfl_flower.round.state import Settlement
from bcsfl_flower.round.statement import (
    RoundStatement,
    StatedReply,
    packet_fault,
    recorded_draw,
)


@dataclass(frozen=True)
class TrailFailure:
    """One failed check, and the round it concerns (None for the trail as a whole)."""

    round: int | None
    message: str


@dataclass
class TrailReport:
    """The outcome of :func:`verify_trail`."""

    failures: list[TrailFailure] = field(default_factory=list)
    checks: int = 0
    anchored: int = 0
    rolled_back: int = 0
    latest_round: int = 0
    settled: Settlement | None = None
    """The last recorded round's settlement, re-derived from its statement (resume reads it)."""
    unaccounted: list[str] = field(default_factory=list)
    """Files of the run directory that no check read: not part of the trail, not audited."""
    notes: list[str] = field(default_factory=list)
    """What the audit could not check and does not count as a failure (a run without
    ``results.json``, for example)."""

    def check(self, condition: bool, message: str, round_number: int | None = None) -> bool:
        """Count one check; record a failure when ``condition`` is false."""
        self.checks += 1
        if not condition:
            self.failures.append(TrailFailure(round_number, message))
        return condition

    def notices(self) -> list[str]:
        """Return the notes, then the unaccounted files as one note (``verify`` prints these)."""
        if not self.unaccounted:
            return list(self.notes)
        return [*self.notes, f"not part of the trail, not audited: {', '.join(self.unaccounted)}"]

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.failures

    def first_broken_round(self) -> int | None:
        """Return the lowest round a failure names, if any does."""
        rounds = [f.round for f in self.failures if f.round is not None]
        return min(rounds) if rounds else None


def timeline(trail: AuditTrail) -> list[AnchoredRound | RolledBackRound]:
    """Return every anchored and rolled-back round of the trail, in round order."""
    records: list[AnchoredRound | RolledBackRound] = [*trail.anchored_rounds(), *trail.rollbacks()]
    return sorted(records, key=lambda record: record.round)


def verify_trail(
    trail: AuditTrail, manifest: ChainManifest, *, accept_shorter_chain: bool = False
) -> TrailReport:
    """Run every check of the module docstring and return the report.

    Parameters
    ----------
    trail : AuditTrail
        The trail, attached to its chain.
    manifest : ChainManifest
        The run's ``chain.json``.
    accept_shorter_chain : bool
        Do not fail when the chain ends before the round the manifest recorded (a chain
        that lost its last rounds in a crash); the rounds it has must still verify.
    """
    report = TrailReport()
    genesis = trail.get_round(0)
    report.check(
        genesis == manifest.genesis_hash,
        f"genesis: contract has 0x{genesis.hex()}, manifest 0x{manifest.genesis_hash.hex()}",
        0,
    )
    report.check(
        manifest.run == to_hex(trail.domain.run),
        f"{manifest.path.name}: run {manifest.run}, the contract's runId is "
        f"0x{trail.domain.run.hex()}",
        0,
    )
    owner = trail.contract.functions.owner().call()
    report.check(
        owner == manifest.operator,
        f"{manifest.path.name}: operator {manifest.operator}, the contract's owner is {owner}",
        0,
    )
    for problem in deployment_record_problems(trail, manifest):
        report.check(False, problem, 0)
    records = timeline(trail)
    latest = report.latest_round = trail.latest_round()
    if not accept_shorter_chain:
        _check_manifest_head(report, trail, manifest, latest, genesis)
    numbers = [record.round for record in records]
    report.check(
        numbers == list(range(1, latest + 1)),
        f"round sequence: expected rounds 1..{latest} once each, found {numbers}",
        _first_gap(numbers),
    )
    registry = _RegistryHistory.read(trail)
    store = ModelStore(manifest.models_dir)
    head = genesis
    anchored_hashes = [(0, genesis)]
    operator_certifies = trail.operator_certifies()
    run_dir = manifest.path.parent
    for link in symbolic_links(run_dir):
        report.check(False, f"{link} is a symbolic link: an audit reads only the run's own files")
    results = RunResults.read(run_dir / RESULTS_FILE)
    report.check(results.problem is None, results.problem or "")
    if not results.present:
        report.notes.append(f"no {RESULTS_FILE}: the run's figures are not audited")
    for problem in results.round_problems(numbers, chain_may_be_short=accept_shorter_chain):
        report.check(False, problem, _round_named(problem))
    stakes = _StakeHistory(trail.domain)
    replies: list[StatedReply] = []
    for record in records:
        statement = _verify_statement(
            report, store, record.round, record.state_root, head, trail.domain
        )
        replies += statement.replies if statement is not None else ()
        stakes.check(report, record, statement)
        if stakes.settled is not None:
            for problem in results.settled_disagreements(
                record.round, stakes.settled.after, stakes.nodes.as_dict()
            ):
                report.check(False, problem, record.round)
        _verify_certificate(report, trail, registry, record, manifest.operator, operator_certifies)
        if statement is not None:
            _verify_certifying_miners(report, statement, record, manifest.operator)
            _verify_decision(report, statement, record, trail.domain, manifest.operator)
            for problem in results.disagreements(record, statement, stakes.nodes.as_dict()):
                report.check(False, problem, record.round)
        if isinstance(record, RolledBackRound):
            report.rolled_back += 1
            report.check(
                record.kept_model_hash == head,
                f"round {record.round}: rollback keeps 0x{record.kept_model_hash.hex()}, "
                f"the last anchored model is 0x{head.hex()}",
                record.round,
            )
            continue
        report.anchored += 1
        report.check(
            record.approval.previous_hash == head,
            f"round {record.round}: links to 0x{record.approval.previous_hash.hex()}, "
            f"previous anchor is 0x{head.hex()}",
            record.round,
        )
        head = record.model_hash
        anchored_hashes.append((record.round, record.model_hash))
    report.check(
        bool(trail.contract.functions.isLatestModel(head).call()),
        f"head: the last anchored model 0x{head.hex()} is not the contract's head",
        anchored_hashes[-1][0],
    )
    for round_number, digest in anchored_hashes:
        try:
            store.verify(digest)
        except (FileNotFoundError, ModelIntegrityError) as err:
            report.check(False, f"round {round_number}: model store: {err}", round_number)
        else:
            report.check(True, "")
    report.settled = stakes.settled
    named = [digest.hex() for _, digest in anchored_hashes] + [r.state_root.hex() for r in records]
    named += [reply.update_hash[2:] for reply in replies]
    report.unaccounted = unaccounted_files(run_dir, manifest, store, named)
    return report


def _round_named(problem: str) -> int | None:
    """Return the round a problem names ("round N: ..." or "... round N, ..."), if any."""
    match = re.search(r"round (\d+)", problem)
    return int(match.group(1)) if match else None


def _check_manifest_head(
    report: TrailReport, trail: AuditTrail, manifest: ChainManifest, latest: int, genesis: bytes
) -> None:
    report.check(
        latest >= manifest.latest_round,
        f"the trail ends at round {latest}, but {manifest.path.name} recorded round "
        f"{manifest.latest_round}: rounds are missing from the chain",
        latest + 1,
    )
    report.check(
        manifest.head_hash is not None,
        f"{manifest.path.name} records no head (every run writes the round and model it reached)",
        0,
    )
    report.check(
        manifest.head_round <= manifest.latest_round,
        f"{manifest.path.name} records head round {manifest.head_round}, past its latest "
        f"round {manifest.latest_round}",
        manifest.head_round,
    )
    if manifest.head_hash is not None and manifest.head_round <= latest:
        recorded = trail.get_round(manifest.head_round) if manifest.head_round else genesis
        report.check(
            recorded == manifest.head_hash,
            f"round {manifest.head_round}: {manifest.path.name} recorded model "
            f"0x{manifest.head_hash.hex()}, the chain has 0x{recorded.hex()}",
            manifest.head_round,
        )


def _first_gap(numbers: list[int]) -> int | None:
    for expected, found in enumerate(numbers, start=1):
        if found != expected:
            return expected
    return None


def _verify_certificate(
    report: TrailReport,
    trail: AuditTrail,
    registry: _RegistryHistory,
    record: AnchoredRound | RolledBackRound,
    operator: str,
    operator_certifies: bool,
) -> None:
    """Check a round's certificate as the contract did, against this run's identity."""
    signed = record.approval if isinstance(record, AnchoredRound) else record.rollback
    label = f"round {record.round}"
    committee = list(record.committee)
    report.check(
        committee == sort_committee(committee),
        f"{label}: committee is not strictly ascending",
        record.round,
    )
    report.check(
        committee_root(committee) == signed.committee_root,
        f"{label}: committee root does not match the committee {committee}",
        record.round,
    )
    signers = []
    for index, signature in enumerate(record.signatures):
        try:
            signers.append(signed.recover(signature, trail.domain))
        except ValueError as err:
            report.check(False, f"{label}: signature {index} is invalid: {err}", record.round)
    report.check(
        len(set(signers)) == len(signers), f"{label}: a miner signed twice: {signers}", record.round
    )
    operator_may_sign = operator_certifies or isinstance(record, RolledBackRound)
    for signer in signers:
        report.check(
            signer in committee,
            f"{label}: signer {signer} is not in the committee (signed in another run?)",
            record.round,
        )
        report.check(
            (signer == operator and operator_may_sign)
            or registry.registered_at(signer, record.block_number),
            f"{label}: signer {signer} was not a registered client at block {record.block_number}",
            record.round,
        )
    required = quorum(len(committee)) if committee else 1
    report.check(
        len(set(signers)) >= required,
        f"{label}: {len(set(signers))} approvals, quorum of {len(committee)} miners is {required}",
        record.round,
    )


def load_statement(store: ModelStore, round_number: int, state_root: bytes) -> RoundStatement:
    """Load a round's state statement from the store, checked against its anchored hash.

    Raises
    ------
    ValueError
        If no statement was anchored, it is missing, it does not hash to
        ``state_root`` (it was modified) or it is not a statement of that round.
    """
    if state_root == bytes(32):
        raise ValueError(f"round {round_number} anchors no state statement")
    try:
        statement = RoundStatement.from_bytes(store.load_document(state_root))
    except (FileNotFoundError, ModelIntegrityError) as err:
        raise ValueError(f"round {round_number}: state statement: {err}") from err
    if statement.round != round_number:
        raise ValueError(f"round {round_number}: its state statement is round {statement.round}'s")
    return statement


def _verify_statement(
    report: TrailReport,
    store: ModelStore,
    round_number: int,
    state_root: bytes,
    head: bytes,
    domain: Eip712Domain,
) -> RoundStatement | None:
    """Check a round's statement and its committee draw; return it if it loads."""
    label = f"round {round_number}"
    try:
        statement = load_statement(store, round_number, state_root)
    except ValueError as err:
        report.check(False, str(err), round_number)
        return None
    report.check(
        statement.previous_hash == to_hex(head),
        f"{label}: the state statement starts from {statement.previous_hash}, the last "
        f"anchored model is 0x{head.hex()}",
        round_number,
    )
    _, problem = recorded_draw(statement)
    report.check(problem is None, problem or "", round_number)
    for index, reply in enumerate(statement.replies):
        fault = packet_fault(reply, round_number, domain)
        report.check(
            fault is None, f"{label}, reply {index} (node {reply.node}): {fault}", round_number
        )
    return statement


def _verify_certifying_miners(
    report: TrailReport,
    statement: RoundStatement,
    record: AnchoredRound | RolledBackRound,
    operator: str,
) -> None:
    """Check that the certifying committee is the drawn miners that sign, or the operator.

    Every drawn miner with an address signed its train reply, so it runs the bcsfl mod
    and is asked to mine; the operator certifies a commit alone only when no drawn miner
    has a key, and a rollback whenever the miners did not (the round may have drawn none).
    """
    signing = sort_committee(m for m in statement.miners if is_address(m)) or [operator]
    allowed = [signing] if isinstance(record, AnchoredRound) else [signing, [operator]]
    kind = "anchored" if isinstance(record, AnchoredRound) else "rollback's"
    report.check(
        list(record.committee) in allowed,
        f"round {record.round}: the {kind} committee {list(record.committee)} is not "
        f"the drawn miners {signing}",
        record.round,
    )


def _verify_decision(
    report: TrailReport,
    statement: RoundStatement,
    record: AnchoredRound | RolledBackRound,
    domain: Eip712Domain,
    operator: str,
) -> None:
    """Check that the chain records what the statement's ballots decide."""
    label = f"round {record.round}"
    try:
        decision, _ = conclude(statement, domain)
        false_records = false_ballot_records(statement, domain)
    except (KeyError, TypeError, ValueError) as err:  # a statement made to break the audit
        report.check(False, f"{label}: its decision cannot be recomputed: {err!r}", record.round)
        return
    for problem in false_records:
        report.check(False, f"{label}: {problem}", record.round)
    if isinstance(record, AnchoredRound):
        carried = None
        if decision.committed and statement.plan is not None:
            carried = statement.plan.scored.get(str(decision.candidate))
        report.check(
            carried == to_hex(record.model_hash),
            f"{label}: the chain anchors 0x{record.model_hash.hex()}, the ballots "
            + (
                f"commit {decision.candidate} ({carried})"
                if carried
                else f"do not: {decision.reason}"
            ),
            record.round,
        )
        return
    expected = stated_rollback_reason(statement, domain)
    report.check(
        record.reason == expected,
        f"{label}: the rollback records the reason {record.reason!r:.80}, the statement's is "
        f"{expected!r:.80}",
        record.round,
    )
    report.check(
        not decision.committed or list(record.committee) != [operator],
        f"{label}: withheld: the ballots commit {decision.candidate}, and the operator alone "
        "certifies its rollback (no quorum of the miners signed a refusal of the commit)",
        record.round,
    )


class _StakeHistory:
    """Each round's settlement, re-derived, held against the next round's stake table."""

    def __init__(self, domain: Eip712Domain) -> None:
        self.domain = domain
        self.nodes = NodeIdentities()
        self.settled: Settlement | None = None

    def check(
        self,
        report: TrailReport,
        record: AnchoredRound | RolledBackRound,
        statement: RoundStatement | None,
    ) -> None:
        """Check the statement's stakes against the last settlement, then settle its round."""
        if statement is None:  # already reported; the next round has nothing to hold to
            self.settled = None
            return
        self._check_members(report, record.round, statement)
        if self.settled is not None:
            differ = [
                f"{who} has {statement.stakes[who]!r}, settled {stake!r}"
                for who, stake in self.settled.after.items()
                if who in statement.stakes and statement.stakes[who] != stake
            ]
            report.check(
                not differ,
                f"round {record.round}: the stake table is not round {record.round - 1}'s "
                f"settlement: {'; '.join(differ[:3])}",
                record.round,
            )
        committed = isinstance(record, AnchoredRound)
        try:
            self.settled = stated_settlement(
                statement, committed, self.domain, self.nodes.as_dict()
            )
        except (KeyError, TypeError, ValueError):  # the decision check reports why
            self.settled = None
        self.nodes.add(statement)

    def _check_members(self, report: TrailReport, number: int, statement: RoundStatement) -> None:
        """Hold the table's identities to the last settlement's plus this round's repliers.

        Values are compared by :meth:`check`; this compares who is in the table. A client
        enters it when it first replies (with its initial stake) and never leaves, so an
        entry that neither the last settlement nor a reply of this round accounts for is
        made up (a phantom stake that would carry into every later settlement), and an
        entry that disappeared was dropped.
        """
        replied = {reply.identity for reply in statement.replies}
        known = set(self.settled.after) if self.settled is not None else set()
        phantoms = sorted(set(statement.stakes) - known - replied)
        report.check(
            not phantoms,
            f"round {number}: the stake table holds {', '.join(phantoms[:3])}, neither in "
            f"round {number - 1}'s settlement nor replying in round {number}",
            number,
        )
        dropped = sorted(known - set(statement.stakes))
        report.check(
            not dropped,
            f"round {number}: the stake table drops {', '.join(dropped[:3])}, "
            f"settled by round {number - 1}",
            number,
        )


@dataclass
class _RegistryHistory:
    """Registration events, to answer "was X registered at block B?".

    Registration is permanent (the contract has no deregistration), so an address is
    registered at every block from the one that emitted its ``ClientRegistered`` on.
    """

    registered_from: dict[str, int]

    @classmethod
    def read(cls, trail: AuditTrail) -> _RegistryHistory:
        first: dict[str, int] = {}
        for event in trail.contract.events.ClientRegistered.get_logs(from_block=trail.deploy_block):
            client = str(event["args"]["client"])
            block = int(event["blockNumber"])
            first[client] = min(block, first.get(client, block))
        return cls(first)

    def registered_at(self, address: str, block: int) -> bool:
        since = self.registered_from.get(address)
        return since is not None and since <= block
