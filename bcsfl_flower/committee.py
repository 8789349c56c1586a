"""Proof-of-Stake committees: stake-weighted, publicly replayable committee draws.

Every BCS-FL round draws a committee of validators (who score candidate models) and
miners (who sign the round's quorum certificate) from the participants that are alive
in that round. A participant's chance of being drawn is proportional to its stake (kept by
:class:`~bcsfl_flower.round.stakes.StakeLedger`), so participants that keep contributing
accepted updates gain influence, and those that are slashed lose it.

The draw is seeded from the previous round's anchored model hash and the round number
(see :func:`committee_seed`), so anyone who reads the chain can recompute who was on the
committee and check that the server did not pick its favourites.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
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
    stakes: Mapping[str, float],
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
    steps with the same stake table (the round record's ``stakes_before``) reproduces
    the committee exactly.

    Parameters
    ----------
    stakes : Mapping[str, float]
        Current stakes (e.g. ``StakeLedger.as_dict()``). Every candidate must have one.
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
    missing = [c for c in ordered if c not in stakes]
    if missing:
        raise KeyError(f"no stake for committee candidates {missing}")
    weights = np.array([float(stakes[c]) for c in ordered], dtype=np.float64)
    seed = committee_seed(previous_model_hash, server_round)
    rng = np.random.default_rng(seed)
    validators = draw_weighted_without_replacement(ordered, weights, num_validators, rng)
    miners = draw_weighted_without_replacement(ordered, weights, num_miners, rng)
    return Committee(
        server_round=int(server_round),
        seed=seed,
        validators=tuple(validators),
        miners=tuple(miners),
    )


def quorum_size(n: int) -> int:
    """Return the number of approvals a committee of ``n`` members needs: ``ceil(2n/3)``.

    Computed as ``(2n + 2) // 3`` in integer arithmetic, so no float rounding can move
    the boundary (n=3 needs 2, n=4 needs 3, n=5 needs 4, n=6 needs 4, n=7 needs 5).

    Raises
    ------
    ValueError
        If ``n < 1``: an empty committee cannot approve anything, and ``ceil(0) = 0``
        would approve everything.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}: {n!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (committee size), got {n}")
    return (2 * n + 2) // 3
