"""``results.json`` against the trail: which of its figures are anchored, which are not.

A run's ``results.json`` is written by the ServerApp, so every figure in it is the
operator's word until the trail backs it. :class:`RunResults` splits a round's record
in two:

* what the trail holds, checked by ``bcsfl audit verify``: the outcome and the model
  (on chain), the rejected clients and their reasons, the stake table the round drew
  its committee from (in the anchored statement) and the one it settled (re-derived
  from the statement by ``verify``);
* everything else (accuracy, client metrics, timings), which ``bcsfl audit show``
  prints under ``unverified``, and so are the run-level figures (the final test
  accuracy, the attackers an experiment planted, the status).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcsfl_flower.chain.certificates import AnchoredRound, RolledBackRound
from bcsfl_flower.packets import to_hex
from bcsfl_flower.round.statement import UNSIGNED_PREFIX, RoundStatement

RESULTS_FILE = "results.json"
"""Name of a run's results file (written by :mod:`bcsfl_vision.results`)."""

GENESIS_ROUND = "0"
"""Key of the initial model's record (its evaluation: the trail holds no round 0 to check)."""

COMPLETED = "completed"
"""``status`` of a run that ran all its rounds (:mod:`bcsfl_vision.results`)."""

VERIFIED_FIELDS = ("round", "outcome", "model_hash", "rejected", "stakes_before", "stakes")
"""The fields of a round's record that ``verify`` checks against the trail."""

_MISSING = object()


@dataclass(frozen=True)
class RunResults:
    """The rounds of a run's ``results.json`` (none when the run directory has none)."""

    rounds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    run_level: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None
    """Why the file could not be read as a run's results (None when it could, or is absent)."""
    present: bool = True
    """Whether the run directory has the file at all."""

    @classmethod
    def read(cls, path: Path) -> RunResults:
        """Read ``path``; a missing file holds no rounds (a run stopped before writing it).

        A file that is a symbolic link, not JSON or not shaped as a run's results holds no
        rounds either, and says why in :attr:`problem`, which ``verify`` reports.
        """
        if path.is_symlink():
            return cls(problem=f"{path.name} is a symbolic link (to {os.readlink(path)})")
        if not path.exists():
            return cls(present=False)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return cls(problem=f"{path.name} is not readable JSON: {err}")
        rounds = document.get("rounds") if isinstance(document, dict) else None
        if not isinstance(rounds, dict) or not all(isinstance(r, dict) for r in rounds.values()):
            return cls(problem=f"{path.name} is not a run's results (no table of round records)")
        run_level = {key: value for key, value in document.items() if key != "rounds"}
        return cls(rounds, run_level)

    def round_problems(
        self, trail_rounds: Sequence[int], *, chain_may_be_short: bool = False
    ) -> list[str]:
        """Return the rounds the file records that the trail does not, and vice versa.

        A run that stopped (not ``completed``) after anchoring a round but before
        recording it may lack the trail's last round; a chain that lost its last rounds in
        a crash (``chain_may_be_short``, as a resume accepts) may lack the file's last
        ones. Every other gap is an edit.
        """
        recorded = set(self.rounds) - {GENESIS_ROUND}  # the initial model's evaluation
        expected = {str(number) for number in trail_rounds}
        latest = max(trail_rounds, default=0)
        problems = [
            f"{RESULTS_FILE} records round {number}, which the trail does not"
            for number in sorted(recorded - expected, key=_round_order)
            if not (chain_may_be_short and _round_order(number) > latest)
        ]
        stopped = self.run_level.get("status") != COMPLETED
        last = str(max(trail_rounds)) if trail_rounds and stopped else None
        problems += [
            f"round {number}: {RESULTS_FILE} has no record of it"
            for number in sorted(expected - recorded - {last}, key=int)
            if self.rounds
        ]
        return problems

    def disagreements(
        self,
        record: AnchoredRound | RolledBackRound,
        statement: RoundStatement,
        identities: Mapping[str, str],
    ) -> list[str]:
        """Return where round ``record.round``'s record contradicts the trail.

        Every field of :data:`VERIFIED_FIELDS` must be there and agree; ``identities``
        maps node ids to the identities the rounds so far bound them to.
        """
        entry = self.rounds.get(str(record.round))
        if entry is None:
            return []
        label = f"round {record.round}: {RESULTS_FILE}"
        anchored = isinstance(record, AnchoredRound)
        model = record.model_hash if isinstance(record, AnchoredRound) else record.kept_model_hash
        expected = {
            "round": record.round,
            "outcome": "commit" if anchored else "rollback",
            "model_hash": to_hex(model),
            "rejected": dict(statement.rejected),
        }
        problems = [
            f"{label} says {name} {entry.get(name, '(missing)')!r}, the trail {value!r}"
            for name, value in expected.items()
            if entry.get(name, _MISSING) != value
        ]
        before = entry.get("stakes_before", _MISSING)
        if not isinstance(before, Mapping):
            return [*problems, f"{label} has no stake table stakes_before: {before!r}"]
        for node, stake in before.items():
            identity = identities.get(str(node), f"{UNSIGNED_PREFIX}{node}")
            stated = statement.stakes.get(identity)
            if stake != stated:
                problems.append(
                    f"{label} says node {node} held stake {stake!r}, the statement "
                    f"{'has no such client' if stated is None else repr(stated)}"
                )
        return problems + _omitted(label, "stakes_before", before, statement.stakes, identities)

    def settled_disagreements(
        self, round_number: int, settled: Mapping[str, float], identities: Mapping[str, str]
    ) -> list[str]:
        """Return where round ``round_number``'s settled ``stakes`` differ from the trail's.

        ``settled`` is the settlement ``verify`` re-derived (by identity); ``identities``
        maps node ids to identities as the rounds so far left them.
        """
        entry = self.rounds.get(str(round_number))
        if entry is None:
            return []
        label = f"round {round_number}: {RESULTS_FILE}"
        stakes = entry.get("stakes", _MISSING)
        if not isinstance(stakes, Mapping):
            return [f"{label} has no settled stake table stakes: {stakes!r}"]
        problems = []
        for node, stake in stakes.items():
            identity = identities.get(str(node), f"{UNSIGNED_PREFIX}{node}")
            trail_stake = settled.get(identity)
            if trail_stake is None or stake != trail_stake:
                problems.append(
                    f"{label} says node {node} settled at stake {stake!r}, the trail "
                    f"{'has no such client' if trail_stake is None else repr(trail_stake)}"
                )
        return problems + _omitted(label, "stakes", stakes, settled, identities)

    def run_unverified(self) -> dict[str, Any]:
        """Return the run-level figures (none of them is held by the trail)."""
        return dict(self.run_level)

    def unverified(self, round_number: int) -> dict[str, Any]:
        """Return round ``round_number``'s figures that the trail does not hold."""
        entry = self.rounds.get(str(round_number), {})
        return {key: value for key, value in entry.items() if key not in VERIFIED_FIELDS}


def _omitted(
    label: str,
    name: str,
    table: Mapping[str, Any],
    trail_table: Mapping[str, Any],
    identities: Mapping[str, str],
) -> list[str]:
    """Return a problem naming the trail's clients that ``table`` (by node id) leaves out."""
    listed = {identities.get(str(node), f"{UNSIGNED_PREFIX}{node}") for node in table}
    left_out = sorted(set(trail_table) - listed)
    if not left_out:
        return []
    return [f"{label}'s {name} leaves out {', '.join(left_out[:3])}, in the trail's table"]


def _round_order(number: str) -> int:
    """Sort key of a round key of results.json (a key that is not a number sorts first)."""
    return int(number) if number.isdigit() else -1
