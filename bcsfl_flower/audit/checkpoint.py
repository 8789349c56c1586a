"""What a stopped run continues from: its chain, its last anchored model and its stakes.

A run's output directory holds everything a restart needs: the chain state (the
embedded journal, anvil's state file, or a URL with the contract's address), the
content-addressed model store, ``chain.json`` and ``results.json``. The chain is the
source of truth:

* the round counter is the last round recorded on chain (anchored or rolled back), so
  no round is anchored twice and none is skipped;
* the model is the last anchored one, loaded from the store and re-hashed against its
  anchor;
* the stake table is the one the last recorded round settled, re-derived from its
  anchored statement (:mod:`~bcsfl_flower.round.settlement`), keyed by the clients'
  addresses (node ids change when a federation restarts; a client proves its address
  with its signed packet), so ``results.json`` decides nothing about stake;
* rounds that ``results.json`` recorded but the chain does not have (a chain that lost
  its last seconds in a crash) are dropped and run again.

A trail that does not verify (:func:`~bcsfl_flower.audit.verification.verify_trail`)
is refused, naming the first broken round; so is a run that already finished.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

from eth_utils import is_address
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log

from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.chain.model_store import ModelIntegrityError
from bcsfl_flower.round.notary import RoundNotary
from bcsfl_flower.round.state import Settlement


class ResumeError(RuntimeError):
    """The run cannot be resumed; the message says why (and which round is broken)."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a stopped run continues.

    Attributes
    ----------
    round : int
        The last round recorded on chain; the run continues with ``round + 1``.
    arrays : ArrayRecord
        The last anchored model (the genesis if none was anchored).
    stakes : Mapping[str, float]
        Stakes by client address, as the last recorded round settled them.
    dropped_rounds : tuple[int, ...]
        Rounds ``results.json`` recorded beyond the chain; they are run again.
    """

    round: int
    arrays: ArrayRecord
    stakes: Mapping[str, float]
    dropped_rounds: tuple[int, ...] = ()


def load_checkpoint(
    manifest: ChainManifest,
    notary: RoundNotary,
    results: Mapping[str, Any],
    num_rounds: int,
) -> Checkpoint:
    """Verify a stopped run's trail and return where it continues.

    Parameters
    ----------
    manifest : ChainManifest
        The run's ``chain.json`` as it was before the notary reopened the chain.
    notary : RoundNotary
        The run's notary, reattached to its chain state.
    results : Mapping[str, Any]
        The run's ``results.json``.
    num_rounds : int
        The run's configured number of rounds.

    Raises
    ------
    ResumeError
        If the run finished, its trail does not verify, or it has no round left.
    """
    if results.get("status") == "completed":
        raise ResumeError("the run finished; there is nothing to resume")
    report = verify_trail(notary.trail, manifest, accept_shorter_chain=True)
    if not report.ok:
        round_number = report.first_broken_round()
        where = f"at round {round_number}" if round_number is not None else ""
        details = "; ".join(failure.message for failure in report.failures[:3])
        raise ResumeError(f"the audit trail does not verify {where}: {details}")
    latest = report.latest_round
    if latest >= num_rounds:
        raise ResumeError(
            f"the chain already records round {latest} of {num_rounds}; nothing is left to run"
        )
    _, head = notary.trail.head()
    try:
        stored = notary.store.load(head)
    except (FileNotFoundError, ModelIntegrityError) as err:
        raise ResumeError(f"the last anchored model cannot be loaded: {err}") from err
    rounds = results.get("rounds", {})
    dropped = tuple(sorted(int(r) for r in rounds if int(r) > latest))
    if dropped:
        log(WARNING, "resume: rounds %s are not on chain and will be run again", list(dropped))
    return Checkpoint(
        round=latest,
        arrays=ArrayRecord({key: Array(value) for key, value in stored.items()}),
        stakes=_by_address(report.settled),
        dropped_rounds=dropped,
    )


def _by_address(settlement: Settlement | None) -> dict[str, float]:
    """Return the settled stakes of signed clients (node ids change on restart)."""
    if settlement is None:
        return {}
    return {who: stake for who, stake in settlement.after.items() if is_address(who)}
