"""The round's state statement: what an auditor needs to re-derive its committee and replay it.

The contract keeps one slot, so a round's inputs live off chain, in the model store, as
one canonical JSON document whose SHA-256 hash every miner signs (``stateRoot`` in the
``RoundApproval``) and the chain records (in ``RoundAnchored`` or ``RoundRolledBack``).
The statement holds, as the round saw them before its committee was drawn:

* the stake table (every participant the ledger knows, by identity), which weighs the
  draw and the aggregate; successive statements give the stake each round settled;
* the decision settings (seats, tolerances, screening thresholds, selection rule);
* the accepted replies, in order: node, identity, example count and the hash of the
  update (with its signed packet, when the client signed one);
* the draw's candidates (the clients screening trusted or set apart) and the drawn
  validators and miners, by identity;
* once the validators have scored: the candidates (:class:`StatedPlan`: their names,
  the hash of every scored model, whom each draws on) and the validators' ballots
  (:mod:`~bcsfl_flower.ballots`), from which :func:`~bcsfl_flower.round.conclusion.conclude`
  derives the decision. The miners sign the statement's hash only then, so the
  anchored ``stateRoot`` commits to the ballots.

An identity is the client's Ethereum address when it signed its reply, else
``node:<id>``: node ids are not on chain and change when a SuperNode reconnects, so the
draw is over addresses and anyone can recompute it (:func:`redraw`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from bcsfl_flower.committee import Committee, draw_committee
from bcsfl_flower.packets import Eip712Domain, SignedModelPacket, to_hex
from bcsfl_flower.round.settings import RoundSettings
from bcsfl_flower.round.stakes import (
    DEFAULT_LEFT_OUT_FRACTION,
    DEFAULT_REWARD,
    DEFAULT_SLASH_FRACTION,
    DEFAULT_STAKE_CEILING,
    StakePolicy,
)
from bcsfl_flower.round.state import CandidatePlan

STATEMENT_FORMAT = "bcsfl-round-statement/3"
"""Value of ``format`` in a statement document."""

UNSIGNED_PREFIX = "node:"
"""Identity prefix of a client that did not sign its reply."""

_PACKET_BYTES = ("model-hash", "signature")
"""The packet record's fields that are bytes (hex in the statement's JSON)."""


@dataclass(frozen=True)
class StatedReply:
    """One accepted training reply, as the statement records it.

    Attributes
    ----------
    node : str
        The Flower node id (as ``str``), as the round's other records key it.
    identity : str
        The signer's address, or ``node:<id>`` for an unsigned reply.
    num_examples : float
        The example count the client reported (the bounds cap it).
    update_hash : str
        ``0x``-hex :func:`~bcsfl_flower.packets.model_hash` of the reply's arrays.
    packet : Mapping[str, Any] | None
        The signed packet's fields, or None for an unsigned reply.
    """

    node: str
    identity: str
    num_examples: float
    update_hash: str
    packet: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DecisionSettings:
    """The settings that decide a round and settle its stakes, as replay needs them."""

    num_validators: int
    num_miners: int
    vote_tolerance: float
    outlier_norm_ratio: float
    split_margin: float
    example_cap_ratio: float
    selection: str
    space: str
    noisy_updates: bool = False
    stake_reward: float = DEFAULT_REWARD
    stake_slash: float = DEFAULT_SLASH_FRACTION
    stake_ceiling: float = DEFAULT_STAKE_CEILING
    stake_left_out: float = DEFAULT_LEFT_OUT_FRACTION

    @classmethod
    def of(cls, settings: RoundSettings, selection: str, space: str) -> DecisionSettings:
        """Return the decision settings of a pipeline."""
        return cls(
            settings.num_validators,
            settings.num_miners,
            settings.vote_tolerance,
            settings.outlier_norm_ratio,
            settings.split_margin,
            settings.example_cap_ratio,
            selection,
            space,
            settings.noisy_updates,
            settings.stake_reward,
            settings.stake_slash,
            settings.stake_ceiling,
            settings.stake_left_out,
        )

    @property
    def stake_policy(self) -> StakePolicy:
        """Return how the round settles stakes (:func:`~bcsfl_flower.round.stakes.settle`)."""
        return StakePolicy(
            self.stake_reward, self.stake_slash, self.stake_ceiling, self.stake_left_out
        )


@dataclass(frozen=True)
class StatedPlan:
    """The candidates as the statement records them: what the ballots' hashes mean.

    Attributes
    ----------
    names : tuple[str, ...]
        Candidate names, in order of preference
        (:attr:`~bcsfl_flower.round.state.CandidatePlan.names`).
    scored : Mapping[str, str]
        Every model the validators scored but ``w_t`` (the candidates, and the noise
        references when the round built them) -> its ``0x``-hex model hash.
    supports, fallback_suspects, owners, contested, parties
        As in :class:`~bcsfl_flower.round.state.CandidatePlan` (rows index the
        statement's replies; owners and parties are node ids).
    """

    names: tuple[str, ...] = ()
    scored: Mapping[str, str] = field(default_factory=dict)
    supports: tuple[tuple[int, ...], ...] = ()
    fallback_suspects: tuple[int, ...] = ()
    owners: tuple[str | None, ...] = ()
    contested: bool = False
    parties: tuple[str, ...] = ()

    @classmethod
    def of(cls, plan: CandidatePlan, scored: Mapping[str, bytes]) -> StatedPlan:
        """Return the record of ``plan``, whose scored models hash to ``scored``."""
        return cls(
            names=plan.names,
            scored={name: to_hex(digest) for name, digest in scored.items()},
            supports=plan.supports,
            fallback_suspects=plan.fallback_suspects,
            owners=plan.owners,
            contested=plan.contested,
            parties=plan.parties,
        )

    def candidate_plan(self) -> CandidatePlan:
        """Return the plan a selection rule decides (without coefficients, which it needs not)."""
        return CandidatePlan(
            names=self.names,
            coefficients=np.zeros((len(self.names), 0)),
            supports=self.supports,
            fallback_suspects=self.fallback_suspects,
            owners=self.owners,
            contested=self.contested,
            parties=self.parties,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StatedPlan:
        """Parse the plan's JSON form."""
        return cls(
            names=tuple(raw["names"]),
            scored={str(k): str(v) for k, v in raw["scored"].items()},
            supports=tuple(tuple(int(i) for i in rows) for rows in raw["supports"]),
            fallback_suspects=tuple(int(i) for i in raw["fallback_suspects"]),
            owners=tuple(raw["owners"]),
            contested=bool(raw["contested"]),
            parties=tuple(raw["parties"]),
        )


@dataclass(frozen=True)
class RoundStatement:
    """One round's state statement; its :meth:`digest` is the anchored ``stateRoot``.

    Attributes
    ----------
    round : int
        The round.
    previous_hash : str
        ``0x``-hex hash of ``w_t``, the model the round starts from.
    settings : DecisionSettings
        How the round decides.
    stakes : Mapping[str, float]
        The stake table by identity when the committee was drawn.
    replies : tuple[StatedReply, ...]
        The accepted replies, in the order the round checked them.
    candidates : tuple[str, ...]
        Identities the committee was drawn from (the trusted and set-apart clients).
    set_apart : tuple[str, ...]
        The candidates the screen set apart (the rest it trusted): with the decision
        and the stake policy, what the round's settlement follows from
        (:mod:`~bcsfl_flower.round.settlement`).
    validators, miners : tuple[str, ...]
        The drawn committee by identity, in draw order.
    sketch_seed : int | None
        Seed of the screening's direction sketch (None when compared exactly).
    model_keys : tuple[str, ...]
        The global model's array keys in the round's order: the order the updates were
        flattened in, which replay repeats so its sums are bit-identical.
    plan : StatedPlan | None
        The candidates the validators scored (None when the round built none).
    ballots : tuple[Mapping[str, Any], ...]
        The validators' ballots, in draw order: a signed ballot's
        :meth:`~bcsfl_flower.ballots.SignedBallot.to_fields`, or, for a validator that
        cannot sign (an unsigned ``node:`` identity), ``{"validator": identity,
        "loss_bits": {model name: bits}}``.
    rejected : Mapping[str, str]
        Node id -> reason, for every client rejected by a check or by screening
        (:func:`~bcsfl_flower.round.state.rejected_clients`), so the rejections a run
        reports are anchored with the round.
    """

    round: int
    previous_hash: str
    settings: DecisionSettings
    stakes: Mapping[str, float]
    replies: tuple[StatedReply, ...] = ()
    candidates: tuple[str, ...] = ()
    set_apart: tuple[str, ...] = ()
    validators: tuple[str, ...] = ()
    miners: tuple[str, ...] = ()
    sketch_seed: int | None = None
    model_keys: tuple[str, ...] = ()
    plan: StatedPlan | None = None
    ballots: tuple[Mapping[str, Any], ...] = ()
    rejected: Mapping[str, str] = field(default_factory=dict)
    format: str = field(default=STATEMENT_FORMAT)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.stakes.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"stakes must be finite and >= 0, got {bad}")
        unknown = [c for c in self.candidates if c not in self.stakes]
        if unknown:
            raise ValueError(f"draw candidates {unknown} have no stake in the statement")
        stray = [c for c in self.set_apart if c not in self.candidates]
        if stray:
            raise ValueError(f"set-apart clients {stray} are not draw candidates")

    def to_bytes(self) -> bytes:
        """Return the canonical encoding (sorted keys, no spaces, exact floats)."""
        return self._encoded

    def digest(self) -> bytes:
        """Return SHA-256 of :meth:`to_bytes`: the ``stateRoot`` the miners sign."""
        return self._digest

    # A round encodes its statement for the miners, the chain and the store: once.
    @cached_property
    def _encoded(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def _digest(self) -> bytes:
        return hashlib.sha256(self._encoded).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundStatement:
        """Parse a statement written by :meth:`to_bytes`.

        Raises
        ------
        ValueError
            If it is not a statement of this format, naming what is wrong.
        """
        try:
            raw = json.loads(data)
            if raw.get("format") != STATEMENT_FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, not {STATEMENT_FORMAT!r}")
            return cls(
                round=int(raw["round"]),
                previous_hash=str(raw["previous_hash"]),
                settings=DecisionSettings(**raw["settings"]),
                stakes={str(k): float(v) for k, v in raw["stakes"].items()},
                replies=tuple(StatedReply(**reply) for reply in raw["replies"]),
                candidates=tuple(raw["candidates"]),
                set_apart=tuple(raw["set_apart"]),
                validators=tuple(raw["validators"]),
                miners=tuple(raw["miners"]),
                sketch_seed=raw["sketch_seed"],
                model_keys=tuple(raw["model_keys"]),
                plan=None if raw["plan"] is None else StatedPlan.from_dict(raw["plan"]),
                ballots=tuple(raw["ballots"]),
                rejected={str(k): str(v) for k, v in raw["rejected"].items()},
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(f"not a round statement: {err!r}") from err

    def node_of(self) -> dict[str, str]:
        """Return identity -> node id for the round's accepted replies."""
        return {reply.identity: reply.node for reply in self.replies}


def packet_fields(signed: SignedModelPacket) -> dict[str, Any]:
    """Return a signed packet as the statement records it: its wire record, bytes as hex."""
    return {
        key: to_hex(value) if isinstance(value, bytes) else value
        for key, value in signed.to_config_record().items()
    }


def signed_packet(fields: Mapping[str, Any]) -> SignedModelPacket:
    """Rebuild a signed packet from :func:`packet_fields` (its wire reader checks it)."""
    return SignedModelPacket.from_config_record(
        ConfigRecord(
            {
                key: bytes.fromhex(value[2:]) if key in _PACKET_BYTES else value
                for key, value in fields.items()
            }
        )
    )


def packet_fault(reply: StatedReply, round_number: int, domain: Eip712Domain) -> str | None:
    """Return why a stated reply's signed packet does not sign its update (None if it does).

    The packet must recover, under the trail's domain (chain, contract and run), to the
    reply's identity, and sign this round and the stated update hash: a packet spliced in
    from another run or round, or re-pointed at another update, fails.
    """
    if reply.packet is None:
        return None
    try:
        packet = signed_packet(reply.packet)
        signer = packet.recover(domain)
    except (KeyError, TypeError, ValueError) as err:
        return f"its signed packet cannot be read: {err}"
    if (
        signer != reply.identity
        or to_hex(packet.packet.model_hash) != reply.update_hash
        or packet.packet.round != round_number
    ):
        return (
            f"its signed packet does not sign update {reply.update_hash} of round "
            f"{round_number} by {reply.identity}"
        )
    return None


def identity_of(node: str, address: str | None) -> str:
    """Return a client's identity: its address when it signed, else ``node:<id>``."""
    return address if address is not None else f"{UNSIGNED_PREFIX}{node}"


def redraw(statement: RoundStatement) -> Committee:
    """Recompute the round's committee from the statement alone, by identity.

    The draw is :func:`~bcsfl_flower.committee.draw_committee` over the candidates with
    the statement's stakes, seeded by (previous model hash, round), exactly as the
    round drew it. Seats beyond the candidates with stake are clamped here, silently
    (the draw consumes one uniform per candidate whatever the seats, so clamping first
    changes nothing but the warning an auditor would otherwise see every round).
    """
    eligible = sum(1 for c in statement.candidates if statement.stakes[c] > 0)
    return draw_committee(
        {c: statement.stakes[c] for c in statement.candidates},
        statement.candidates,
        min(statement.settings.num_validators, eligible),
        min(statement.settings.num_miners, eligible),
        statement.previous_hash,
        statement.round,
    )


def recorded_draw(statement: RoundStatement) -> tuple[Committee, str | None]:
    """Redraw the committee; return it and, if the statement records another one, why not.

    ``bcsfl audit verify`` and ``bcsfl audit replay`` both judge a recorded committee
    with this one check.
    """
    drawn = redraw(statement)
    if (drawn.validators, drawn.miners) == (statement.validators, statement.miners):
        return drawn, None
    return drawn, (
        f"round {statement.round}: the committee is not the stake-weighted draw from its "
        f"statement: it lists validators {list(statement.validators)} and miners "
        f"{list(statement.miners)}, the draw gives {list(drawn.validators)} and "
        f"{list(drawn.miners)}"
    )


def by_node(drawn: Committee, node_of: Mapping[str, str]) -> Committee:
    """Return a committee drawn by identity with its members as node ids.

    The pipeline talks to node ids; the statement and the chain record identities.
    """
    return Committee(
        drawn.server_round,
        drawn.seed,
        tuple(node_of[v] for v in drawn.validators),
        tuple(node_of[m] for m in drawn.miners),
    )
