"""Every attack of the bench, by name: byzfl's, the adaptive ones and BCSFL-specific ones."""

from __future__ import annotations

from collections.abc import Mapping

from sim.robust.adaptive_attacks import ADAPTIVE_ATTACKS
from sim.robust.attacks import BASE_ATTACKS, Attack
from sim.robust.strategic_attacks import STRATEGIC_ATTACKS

ATTACKS: Mapping[str, type[Attack]] = {
    **BASE_ATTACKS,
    **{attack.name: attack for attack in (*ADAPTIVE_ATTACKS, *STRATEGIC_ATTACKS)},
}
"""Attacks by name (the evaluation set draws from all but ``clean``)."""
