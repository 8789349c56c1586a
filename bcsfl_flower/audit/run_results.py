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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcsfl_flower.chain.certificates import AnchoredRound, RolledBackRound
from bcsfl_flower.round.statement import UNSIGNED_PREFIX, RoundStatement

RESULTS_FILE = "results.json"
"""Name of a run's results file (written by :mod:`bcsfl_vision.results`)."""

VERIFIED_FIELDS = ("outcome", "model_hash", "rejected", "stakes_before", "stakes")
"""The fields of a round's record that ``verify`` checks against the trail."""


@dataclass(frozen=True)
class RunResults:
    """The rounds of a run's ``results.json`` (none when the run directory has none)."""

    rounds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    run_level: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> RunResults:
        """Read ``path``; a missing or unreadable file holds no rounds (nothing to check)."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            rounds = document.get("rounds", {})
        except (OSError, ValueError, AttributeError):
            return cls()
        run_level = {key: value for key, value in document.items() if key != "rounds"}
        return cls(rounds if isinstance(rounds, dict) else {}, run_level)

    def disagreements(
        self, record: AnchoredRound | RolledBackRound, statement: RoundStatement
    ) -> list[str]:
        """Return where round ``record.round``'s record contradicts the trail."""
        entry = self.rounds.get(str(record.round))
        if not isinstance(entry, Mapping):
            return []
        label = f"round {record.round}: results.json"
        anchored = isinstance(record, AnchoredRound)
        model = record.model_hash if anchored else record.kept_model_hash
        expected = {
            "outcome": "commit" if anchored else "rollback",
            "model_hash": "0x" + model.hex(),
            "rejected": dict(statement.rejected),
        }
        problems = [
            f"{label} says {name} {entry.get(name)!r}, the trail {value!r}"
            for name, value in expected.items()
            if name in entry and entry[name] != value
        ]
        identity = {reply.node: reply.identity for reply in statement.replies}
        for node, stake in dict(entry.get("stakes_before", {})).items():
            stated = statement.stakes.get(identity.get(node, ""))
            if stated is not None and stake != stated:
                problems.append(
                    f"{label} says node {node} held stake {stake}, the statement {stated}"
                )
        return problems

    def settled_disagreements(
        self, round_number: int, settled: Mapping[str, float], identities: Mapping[str, str]
    ) -> list[str]:
        """Return where round ``round_number``'s settled ``stakes`` differ from the trail's.

        ``settled`` is the settlement ``verify`` re-derived (by identity); ``identities``
        maps node ids to identities as the rounds so far left them.
        """
        entry = self.rounds.get(str(round_number))
        stakes = entry.get("stakes") if isinstance(entry, Mapping) else None
        if not isinstance(stakes, Mapping):
            return []
        label = f"round {round_number}: {RESULTS_FILE}"
        problems = []
        for node, stake in stakes.items():
            identity = identities.get(str(node), f"{UNSIGNED_PREFIX}{node}")
            trail_stake = settled.get(identity)
            if trail_stake is None or stake != trail_stake:
                problems.append(
                    f"{label} says node {node} settled at stake {stake!r}, the trail "
                    f"{'has no such client' if trail_stake is None else repr(trail_stake)}"
                )
        return problems

    def run_unverified(self) -> dict[str, Any]:
        """Return the run-level figures (none of them is held by the trail)."""
        return dict(self.run_level)

    def unverified(self, round_number: int) -> dict[str, Any]:
        """Return round ``round_number``'s figures that the trail does not hold."""
        entry = self.rounds.get(str(round_number), {})
        return {key: value for key, value in entry.items() if key not in VERIFIED_FIELDS}
