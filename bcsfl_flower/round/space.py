"""The update-space interface: how a round reads, compares and combines client updates.

Every later stage of a round works on two things only: the ``(n, n)`` inner products
of the updates (the Gram matrix) and weightings of the updates (candidate ``c`` is
``w_t + sum_k a_ck d_k``). Norms, clipping, centring, clustering, the geometric median
and every candidate follow from those, so the defence is the same whether the server
holds the updates in plaintext (:class:`~bcsfl_flower.round.plain.PlainSpace`) or only
as CKKS ciphertexts (:class:`~bcsfl_flower.round.encrypted.EncryptedSpace`).

The strategy picks one space by name at start-up (:func:`update_space`) and never
branches on the mode again.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from bcsfl_flower.protocol import ConfigValue
from bcsfl_flower.round.state import GramResult, UpdateBatch

BatchT = TypeVar("BatchT", bound=UpdateBatch)
"""The batch class of one update space: only that space makes and reads it."""


@dataclass(frozen=True)
class GramExchange:
    """What a space may need to obtain a round's Gram matrix.

    Attributes
    ----------
    grid : Grid
        The ServerApp's grid.
    server_round : int
        The current round.
    draw_keyholders : Callable[[], tuple[str, ...]]
        Draws, by stake among the round's accepted clients, those that decrypt (CKKS).
    timeout : float
        Seconds to wait for them.
    """

    grid: Grid
    server_round: int
    draw_keyholders: Callable[[], tuple[str, ...]]
    timeout: float


class UpdateCollector(ABC, Generic[BatchT]):
    """Reads one round's replies into its space's :class:`~bcsfl_flower.round.state.UpdateBatch`."""

    @abstractmethod
    def add(self, arrays: ArrayRecord) -> str | None:
        """Check one reply's arrays; keep the update and return None, or return why not."""

    @abstractmethod
    def finish(self) -> BatchT:
        """Return the batch of every update kept, in the order they were added."""


class UpdateSpace(ABC, Generic[BatchT]):
    """Plaintext or encrypted updates behind one interface, generic over the space's batch."""

    name: str
    """Registry name (``"plain"``, ``"ckks"``)."""

    def prepare(self, grid: Grid, initial_arrays: ArrayRecord, timeout: float) -> None:
        """Get ready before the first round (the CKKS space fetches its public context)."""

    def message_config(self) -> Mapping[str, ConfigValue]:
        """Config entries every train and evaluate message of this space carries."""
        return {}

    @abstractmethod
    def collector(self, global_arrays: ArrayRecord, capacity: int) -> UpdateCollector[BatchT]:
        """Return a collector for the replies to ``global_arrays`` (at most ``capacity``)."""

    @abstractmethod
    def gram(self, batch: BatchT, exchange: GramExchange) -> GramResult:
        """Return the inner products of the batch's updates."""

    @abstractmethod
    def combine(
        self, global_arrays: ArrayRecord, batch: BatchT, coefficients: np.ndarray
    ) -> tuple[ArrayRecord, ...]:
        """Return ``w_t + sum_k coefficients[c, k] d_k`` for every row ``c``."""


UPDATE_SPACES: Mapping[str, str] = {
    "plain": "bcsfl_flower.round.plain:PlainSpace",
    "ckks": "bcsfl_flower.round.encrypted:EncryptedSpace",
}
"""Update spaces by name, as ``module:class`` so TenSEAL is imported only for ``"ckks"``."""


def update_space(name: str) -> UpdateSpace[Any]:
    """Return a new update space of the registered ``name``.

    Raises
    ------
    ValueError
        If no space has that name.
    """
    if name not in UPDATE_SPACES:
        raise ValueError(f"update space must be one of {sorted(UPDATE_SPACES)}, got {name!r}")
    module, _, cls = UPDATE_SPACES[name].partition(":")
    return cast("UpdateSpace[Any]", getattr(importlib.import_module(module), cls)())
