"""Checkpoints of a trail's head, kept outside the run, against truncation and rewrites.

``verify`` can only check a trail against what the run directory says, and a directory
that is cut short (its last journal lines deleted, ``chain.json``'s head edited to
match) says nothing false about what is left. An auditor who recorded the head earlier
(``bcsfl audit head > head.json``, or from a notice the operator published) asks
``bcsfl audit verify --head head.json`` whether today's trail still extends it: same
chain, contract, genesis and run, at least as many rounds, and the same model anchored at
the recorded head. A rewrite of a recorded round, or a truncation, then fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from bcsfl_flower.chain.audit import AuditTrail
from bcsfl_flower.chain.errors import RoundNotAnchoredError
from bcsfl_flower.packets import to_hex


@dataclass(frozen=True)
class TrailHead:
    """Where a trail stood: enough to tell later whether another trail extends it.

    Attributes
    ----------
    chain_id, contract : int, str
        The chain and the ``BCSFLAudit`` contract.
    genesis_hash : str
        Hex hash of the initial model.
    run : str
        Hex of the run's identity (the contract's ``runId``): two runs from the same
        genesis at the same address (the embedded chain's) still differ here.
    latest_round : int
        The last recorded round, anchored or rolled back.
    round, model_hash : int, str
        The last anchored round and its model's hex hash (round 0: the genesis).
    """

    chain_id: int
    contract: str
    genesis_hash: str
    run: str
    latest_round: int
    round: int
    model_hash: str

    @classmethod
    def read(cls, trail: AuditTrail, chain_id: int) -> TrailHead:
        """Return the head of ``trail`` on chain ``chain_id`` now."""
        head_round, head_hash = trail.head()
        return cls(
            chain_id=chain_id,
            contract=trail.address,
            genesis_hash=to_hex(trail.genesis_hash()),
            run=to_hex(trail.domain.run),
            latest_round=trail.latest_round(),
            round=head_round,
            model_hash=to_hex(head_hash),
        )

    def to_json(self) -> str:
        """Return the head as a JSON object (what ``bcsfl audit head`` prints)."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> TrailHead:
        """Read a head written by :meth:`to_json`.

        Raises
        ------
        ValueError
            If the file is not such a head, naming the field.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(
                chain_id=int(data["chain_id"]),
                contract=to_checksum_address(data["contract"]),
                genesis_hash=str(data["genesis_hash"]).lower(),
                run=str(data["run"]).lower(),
                latest_round=int(data["latest_round"]),
                round=int(data["round"]),
                model_hash=str(data["model_hash"]).lower(),
            )
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON: {err}") from err
        except KeyError as err:
            raise ValueError(f"{path} lacks the field {err.args[0]!r}") from err

    def extended_by(self, trail: AuditTrail, chain_id: int) -> list[str]:
        """Return why ``trail`` does not extend this head (empty if it does)."""
        now = TrailHead.read(trail, chain_id)
        problems = [
            f"the recorded head is on {name} {recorded}, the trail on {current}"
            for name, recorded, current in (
                ("chain", self.chain_id, now.chain_id),
                ("contract", self.contract, now.contract),
                ("genesis", self.genesis_hash, now.genesis_hash),
                ("run", self.run, now.run),
            )
            if recorded != current
        ]
        if problems:
            return problems
        if now.latest_round < self.latest_round:
            problems.append(
                f"round {now.latest_round + 1}: the trail ends at round {now.latest_round}, "
                f"but the recorded head had reached round {self.latest_round}"
            )
        try:
            anchored = to_hex(trail.get_round(self.round))
        except RoundNotAnchoredError:
            anchored = None
        if anchored != self.model_hash:
            problems.append(
                f"round {self.round}: the recorded head anchored {self.model_hash}, the trail "
                f"{'anchors ' + anchored if anchored else 'has no anchor'} there"
            )
        return problems
