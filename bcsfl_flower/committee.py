"""Proof-of-Stake committees: a stake ledger and stake-weighted committee draws.

Every BCS-FL round draws a committee of validators (who score candidate models) and
miners (who sign the round's quorum certificate) from the participants that are alive
in that round. A participant's chance of being drawn is proportional to its stake, so
participants that keep contributing accepted updates gain influence, and those that are
slashed lose it.

The draw is seeded from the previous round's anchored model hash and the round number
(see :func:`committee_seed`), so anyone who reads the chain can recompute who was on the
committee and check that the server did not pick its favourites.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.common.logger import log

COMMITTEE_SEED_DOMAIN = b"BCSFL/committee/v1"
"""Domain-separation prefix of the committee seed (see :func:`committee_seed`)."""

_HASH_BYTES = 32
_ROUND_BYTES = 8


def _check_id(participant_id: object, name: str = "participant_id") -> str:
    """Return ``participant_id`` if it is a non-empty ``str``, else raise.

    Ids are strings on purpose: Flower node ids are integers and Ethereum addresses are
    hex strings, and mixing ``1`` with ``"1"`` would silently create two participants.
    """
    if not isinstance(participant_id, str):
        raise TypeError(
            f"{name} must be a str (convert Flower node ids with str()), "
            f"got {type(participant_id).__name__}: {participant_id!r}"
        )
    if not participant_id:
        raise ValueError(f"{name} must be a non-empty string")
    return participant_id


def _check_amount(value: float, name: str) -> float:
    """Return ``value`` as a float if it is finite and non-negative, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    result = float(value)
    if not math.isfinite(result) or result < 0.0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return result


class StakeLedger:
    """Stakes of the federation's participants.

    Parameters
    ----------
    stakes : Mapping[str, float] | None (default: None)
        Initial stake of each participant, keyed by participant id (a Flower node id as
        a string, or an Ethereum address). Every stake must be finite and >= ``floor``.
    floor : float (default: 0.0)
        Lowest stake that :meth:`slash` can leave a participant with. With the default
        of 0, a participant can be slashed to zero stake, and a participant with zero
        stake can never be drawn for a committee (its selection probability
        ``S_i / sum S_j`` is zero); it still trains, and :meth:`reward` can bring it
        back. A positive floor keeps every participant eligible.

    Notes
    -----
    The ledger is deliberately a plain in-memory mapping: the strategy owns one,
    updates it after every round and writes :meth:`as_dict` into the round's record,
    which makes the stake history auditable without putting it on chain.
    """

    def __init__(self, stakes: Mapping[str, float] | None = None, *, floor: float = 0.0) -> None:
        self._floor = _check_amount(floor, "floor")
        self._stakes: dict[str, float] = {}
        for participant_id, stake in (stakes or {}).items():
            self.register(participant_id, stake)

    # ----- constructors for the three initial-stake modes ---------------------------
    @classmethod
    def equal(cls, ids: Iterable[str], stake: float = 1.0, *, floor: float = 0.0) -> StakeLedger:
        """Give every participant the same initial stake (``initial-stake = "equal"``).

        Parameters
        ----------
        ids : Iterable[str]
            Participant ids.
        stake : float (default: 1.0)
            The stake each participant starts with; must be > 0 so everyone can be drawn.
        floor : float (default: 0.0)
            See :class:`StakeLedger`.
        """
        if _check_amount(stake, "stake") == 0.0:
            raise ValueError("stake must be > 0 for equal initial stakes, got 0")
        return cls(dict.fromkeys(_unique_ids(ids), stake), floor=floor)

    @classmethod
    def from_data_sizes(cls, num_examples: Mapping[str, int], *, floor: float = 0.0) -> StakeLedger:
        """Stake each participant with its number of training examples.

        This is the ``initial-stake = "data-size"`` mode: a participant that holds more
        data is, a priori, more valuable to the federation and gets proportionally more
        say in the committee.

        Parameters
        ----------
        num_examples : Mapping[str, int]
            Number of training examples per participant (the ``num-examples`` a Flower
            client reports). Each must be an integer >= 0; zero means "never drawn".
        floor : float (default: 0.0)
            See :class:`StakeLedger`.
        """
        stakes: dict[str, float] = {}
        for participant_id, count in num_examples.items():
            if isinstance(count, bool) or not isinstance(count, int | np.integer):
                raise TypeError(f"num_examples[{participant_id!r}] must be an int, got {count!r}")
            if count < 0:
                raise ValueError(f"num_examples[{participant_id!r}] must be >= 0, got {count}")
            stakes[participant_id] = float(count)
        return cls(stakes, floor=floor)

    @classmethod
    def from_mapping(cls, stakes: Mapping[str, float], *, floor: float = 0.0) -> StakeLedger:
        """Use explicitly configured stakes (``initial-stake = "explicit"``)."""
        return cls(stakes, floor=floor)

    # ----- queries -------------------------------------------------------------------
    @property
    def floor(self) -> float:
        """Lowest stake :meth:`slash` can leave a participant with."""
        return self._floor

    def __contains__(self, participant_id: object) -> bool:
        return participant_id in self._stakes

    def __len__(self) -> int:
        return len(self._stakes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stakes)

    def __repr__(self) -> str:
        return f"StakeLedger({self._stakes!r}, floor={self._floor!r})"

    def stake(self, participant_id: str) -> float:
        """Return the stake of one participant (``KeyError`` if unknown)."""
        return self._stakes[self._known(participant_id)]

    def stakes_for(self, ids: Sequence[str]) -> np.ndarray:
        """Return the stakes of ``ids`` as a float64 array, in the order given."""
        return np.array([self._stakes[self._known(i)] for i in ids], dtype=np.float64)

    def total(self) -> float:
        """Return the sum of all stakes."""
        return math.fsum(self._stakes.values())

    def as_dict(self) -> dict[str, float]:
        """Return a snapshot ``{participant id: stake}``, sorted by id, for the results record.

        The snapshot is a copy: later rewards or slashes do not change it.
        """
        return {participant_id: self._stakes[participant_id] for participant_id in sorted(self)}

    # ----- updates -------------------------------------------------------------------
    def register(self, participant_id: str, stake: float) -> None:
        """Add a new participant with an initial stake.

        Raises
        ------
        ValueError
            If the participant is already registered (re-registering would let a
            participant reset a slashed stake), or the stake is negative, non-finite or
            below the ledger's floor.
        """
        _check_id(participant_id)
        value = _check_amount(stake, f"stake of {participant_id!r}")
        if participant_id in self._stakes:
            raise ValueError(f"participant {participant_id!r} is already registered")
        if value < self._floor:
            raise ValueError(
                f"stake of {participant_id!r} ({value}) is below the ledger's floor ({self._floor})"
            )
        self._stakes[participant_id] = value

    def reward(self, ids: Iterable[str], amount: float) -> None:
        """Add ``amount`` to the stake of each participant in ``ids``.

        Called for clients whose update was accepted, so useful work buys influence on
        future committees. An amount of 0 is allowed (rewards switched off).
        """
        value = _check_amount(amount, "amount")
        for participant_id in self._checked_unique(ids):
            self._stakes[participant_id] += value

    def slash(self, ids: Iterable[str], amount: float) -> None:
        """Subtract ``amount`` from the stake of each participant in ``ids``.

        Called for clients whose update was rejected. The stake never drops below the
        ledger's floor; a participant at zero stake cannot be drawn for a committee.
        """
        value = _check_amount(amount, "amount")
        for participant_id in self._checked_unique(ids):
            self._stakes[participant_id] = max(self._stakes[participant_id] - value, self._floor)

    def _known(self, participant_id: str) -> str:
        _check_id(participant_id)
        if participant_id not in self._stakes:
            raise KeyError(f"participant {participant_id!r} is not registered in the stake ledger")
        return participant_id

    def _checked_unique(self, ids: Iterable[str]) -> list[str]:
        # Validate everything before changing anything, so a bad id leaves the ledger as it was.
        unique = _unique_ids(ids)
        for participant_id in unique:
            self._known(participant_id)
        return unique


def _unique_ids(ids: Iterable[str]) -> list[str]:
    """Return ``ids`` as a list, rejecting non-string ids and duplicates."""
    if isinstance(ids, str):
        raise TypeError("ids must be an iterable of ids, not a single str")
    result = [_check_id(i, "id") for i in ids]
    if len(set(result)) != len(result):
        duplicates = sorted({i for i in result if result.count(i) > 1})
        raise ValueError(f"ids contain duplicates: {duplicates}")
    return result


def committee_seed(previous_model_hash: bytes | str, server_round: int) -> int:
    """Derive the committee draw's seed from public chain data.

    The seed is ``int.from_bytes(SHA-256(COMMITTEE_SEED_DOMAIN || h || r), "big")`` where
    ``COMMITTEE_SEED_DOMAIN = b"BCSFL/committee/v1"``, ``h`` is the 32-byte hash of the
    previous round's anchored global model (for round 1: the initial model's hash) and
    ``r`` is ``server_round`` as an 8-byte big-endian unsigned integer.

    Why: the server cannot choose the seed (the previous hash is fixed on chain before
    the round starts) and an auditor can recompute it from the chain alone. The domain
    prefix keeps this seed distinct from any other hash of the same data.

    Parameters
    ----------
    previous_model_hash : bytes | str
        32 raw bytes, or their hex encoding (with or without ``0x``).
    server_round : int
        The current round, 0 <= server_round < 2**64.

    Returns
    -------
    int
        A 256-bit non-negative integer, suitable for ``numpy.random.default_rng``.
    """
    if isinstance(previous_model_hash, str):
        text = previous_model_hash.removeprefix("0x").removeprefix("0X")
        try:
            digest = bytes.fromhex(text)
        except ValueError as err:
            raise ValueError(
                f"previous_model_hash is not valid hex: {previous_model_hash!r}"
            ) from err
    elif isinstance(previous_model_hash, bytes | bytearray):
        digest = bytes(previous_model_hash)
    else:
        raise TypeError(
            "previous_model_hash must be bytes or a hex str, "
            f"got {type(previous_model_hash).__name__}"
        )
    if len(digest) != _HASH_BYTES:
        raise ValueError(
            f"previous_model_hash must be {_HASH_BYTES} bytes (a SHA-256 digest), "
            f"got {len(digest)} bytes"
        )
    if isinstance(server_round, bool) or not isinstance(server_round, int | np.integer):
        raise TypeError(f"server_round must be an int, got {server_round!r}")
    if not 0 <= server_round < 2 ** (8 * _ROUND_BYTES):
        raise ValueError(f"server_round must be in [0, 2**64), got {server_round}")
    message = COMMITTEE_SEED_DOMAIN + digest + int(server_round).to_bytes(_ROUND_BYTES, "big")
    return int.from_bytes(hashlib.sha256(message).digest(), "big")


def draw_weighted_without_replacement(
    ids: Sequence[str], stakes: Sequence[float] | np.ndarray, k: int, rng: np.random.Generator
) -> list[str]:
    """Draw ``k`` distinct ids with probability proportional to stake at every step.

    This is direct weighted random sampling without replacement ("successive
    sampling"): the first id is drawn with ``P_i = S_i / sum_j S_j``, removed, and each
    next id is drawn the same way from those that remain.

    Algorithm (Efraimidis and Spirakis, 2006, in its exponential-race form): for each
    id ``i`` in the given order take ``u_i = rng.random()`` and the key
    ``E_i = -log(1 - u_i) / S_i``, an exponential variable with rate ``S_i``; return the
    ids with the ``k`` smallest keys, smallest first. The minimum of independent
    exponentials is ``i`` with probability ``S_i / sum_j S_j`` and, by memorylessness,
    the race among the rest starts afresh, so the sorted keys are exactly a successive
    sample. One pass, no rejection loop, and the draw depends only on the uniforms, so it
    is easy to reproduce.

    Parameters
    ----------
    ids : Sequence[str]
        Distinct participant ids. The order matters for reproducibility (it decides
        which uniform goes to which id); :func:`draw_committee` sorts them first.
    stakes : Sequence[float] | np.ndarray
        Stake of each id, finite and >= 0. Ids with zero stake are never drawn.
    k : int
        Number of ids to draw, >= 0.
    rng : numpy.random.Generator
        Source of the uniforms; exactly ``len(ids)`` values are consumed.

    Returns
    -------
    list[str]
        The drawn ids in draw order. If fewer than ``k`` ids have positive stake, all
        of them are returned (the draw is clamped) and a warning is logged: a federation
        with fewer clients than committee seats should still run, with a smaller
        committee, rather than stop.
    """
    id_list = _unique_ids(ids)
    weights = np.asarray(stakes, dtype=np.float64)
    if weights.shape != (len(id_list),):
        raise ValueError(
            f"stakes must have one entry per id: got shape {weights.shape} for {len(id_list)} ids"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"stakes must be finite and >= 0, got {weights.tolist()}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

    uniforms = rng.random(len(id_list))
    eligible = weights > 0
    num_eligible = int(np.count_nonzero(eligible))
    if k > num_eligible:
        log(
            WARNING,
            "Committee draw clamped: %s seats requested but only %s participants have "
            "positive stake",
            k,
            num_eligible,
        )
        k = num_eligible
    if k == 0:
        return []
    keys = np.full(len(id_list), np.inf)
    # -log1p(-u) = -log(1 - u) is finite for u in [0, 1); dividing by S_i gives rate S_i.
    keys[eligible] = -np.log1p(-uniforms[eligible]) / weights[eligible]
    # Stable sort: an exact tie (probability zero in practice) goes to the earlier id.
    order = np.argsort(keys, kind="stable")[:k]
    return [id_list[i] for i in order]


@dataclass(frozen=True)
class Committee:
    """The committee of one round.

    Attributes
    ----------
    server_round : int
        The round the committee serves.
    seed : int
        The seed from :func:`committee_seed`; recorded so the draw can be replayed.
    validators : tuple[str, ...]
        Validators in draw order. They score candidate models and vote.
    miners : tuple[str, ...]
        Miners in draw order. They verify the round's package and sign its quorum
        certificate. Validators and miners are drawn independently, so one
        participant may hold both roles (the paper draws the two sets separately, and
        with few clients disjoint roles would leave seats empty).
    """

    server_round: int
    seed: int
    validators: tuple[str, ...]
    miners: tuple[str, ...]

    @property
    def members(self) -> tuple[str, ...]:
        """All distinct participants on the committee, validators first."""
        return tuple(dict.fromkeys(self.validators + self.miners))

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-friendly record (the seed as a 0x-prefixed hex string)."""
        return {
            "server_round": self.server_round,
            "seed": f"0x{self.seed:064x}",
            "validators": list(self.validators),
            "miners": list(self.miners),
        }


def draw_committee(
    ledger: StakeLedger,
    candidates: Iterable[str],
    num_validators: int,
    num_miners: int,
    previous_model_hash: bytes | str,
    server_round: int,
) -> Committee:
    """Draw this round's validators and miners by stake from the live participants.

    The candidates are sorted (as strings) so the result does not depend on the order
    in which the server happened to list its nodes. A generator
    ``numpy.random.default_rng(committee_seed(previous_model_hash, server_round))``
    (PCG64) then draws the validators with :func:`draw_weighted_without_replacement`,
    and the miners from all candidates again with the same generator. Replaying these
    steps with the same ledger snapshot reproduces the committee exactly.

    Parameters
    ----------
    ledger : StakeLedger
        Current stakes. Every candidate must be registered.
    candidates : Iterable[str]
        Ids of the participants that are alive this round.
    num_validators : int
        Validator seats (>= 0). Clamped, with a warning, to the number of candidates
        with positive stake.
    num_miners : int
        Miner seats (>= 0), clamped the same way.
    previous_model_hash : bytes | str
        Hash of the previous anchored global model (32 bytes or hex).
    server_round : int
        The current round.

    Returns
    -------
    Committee
        The drawn committee.
    """
    ordered = sorted(_unique_ids(candidates))
    stakes = ledger.stakes_for(ordered)
    seed = committee_seed(previous_model_hash, server_round)
    rng = np.random.default_rng(seed)
    validators = draw_weighted_without_replacement(ordered, stakes, num_validators, rng)
    miners = draw_weighted_without_replacement(ordered, stakes, num_miners, rng)
    return Committee(
        server_round=int(server_round),
        seed=seed,
        validators=tuple(validators),
        miners=tuple(miners),
    )
