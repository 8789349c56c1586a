"""The explorer page's plots, as Vega-Lite specifications built from a :class:`RunView`.

Each function returns one specification (a plain dict, serialised into the page as JSON
and drawn by the inline Vega-Embed). Data are inlined in the spec's ``data.values``, so
the page needs nothing but itself.
"""

from __future__ import annotations

import re
from typing import Any

from bcsfl_flower.audit.explorer.view import STANDINGS, RunView

SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"
"""The Vega-Lite version the committed bundle draws (a name only: nothing is fetched)."""

STANDING_COLOURS = ("#2e7d32", "#f9a825", "#c62828")
"""Accepted, set apart, rejected: green, amber, red (the order of ``STANDINGS``)."""

ROLES = ("validator", "miner", "validator and miner")
ROLE_COLOURS = ("#1565c0", "#6a1b9a", "#00838f")

Spec = dict[str, Any]


def plots(run: RunView) -> dict[str, Spec]:
    """Return every plot of the page, by the id of the element it is drawn in."""
    order = client_order(run)
    return {
        "accuracy-plot": accuracy_plot(run),
        "stake-plot": stake_plot(run, order),
        "standing-plot": standing_plot(run, order),
        "committee-plot": committee_plot(run, order),
    }


def client_order(run: RunView) -> list[str]:
    """Every client the run names, node ids in numeric order, then other identities."""
    names = {c.client for r in run.rounds for c in r.clients}
    names |= {name for r in run.rounds for name in (*r.stakes, *r.validators, *r.miners)}
    names |= set(run.settled_stakes)
    return sorted(names, key=_natural)


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def accuracy_plot(run: RunView) -> Spec:
    """Test accuracy and loss per round (``results.json``: the operator's word)."""
    values = []
    figures = [(0, run.initial_accuracy, run.initial_loss)]
    figures += [(r.number, r.accuracy, r.loss) for r in run.rounds]
    for number, accuracy, loss in figures:
        if accuracy is not None:
            values.append({"round": number, "figure": "test accuracy", "value": accuracy})
        if loss is not None:
            values.append({"round": number, "figure": "test loss", "value": loss})
    return {
        "$schema": SCHEMA,
        "title": "Accuracy and loss per round (from results.json: unverified)",
        "data": {"values": values},
        "facet": {"column": {"field": "figure", "type": "nominal", "title": None}},
        "resolve": {"scale": {"y": "independent"}},
        "spec": {
            "width": 280,
            "height": 180,
            "mark": {"type": "line", "point": True},
            "encoding": {
                "x": {"field": "round", "type": "quantitative", "axis": {"tickMinStep": 1}},
                "y": {"field": "value", "type": "quantitative", "title": None},
                "tooltip": [{"field": "round"}, {"field": "value", "format": ".4f"}],
            },
        },
    }


def stake_plot(run: RunView, order: list[str]) -> Spec:
    """Each client's stake when each round's committee was drawn, and after the last."""
    values = [
        {"round": r.number, "client": client, "stake": stake}
        for r in run.rounds
        for client, stake in r.stakes.items()
    ]
    settled = (run.rounds[-1].number + 1) if run.rounds else 1
    values += [
        {"round": settled, "client": client, "stake": stake}
        for client, stake in run.settled_stakes.items()
    ]
    return {
        "$schema": SCHEMA,
        "title": "Stake per client (the last point is the final settlement)",
        "width": 600,
        "height": 240,
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "round", "type": "quantitative", "axis": {"tickMinStep": 1}},
            "y": {"field": "stake", "type": "quantitative"},
            "color": {"field": "client", "type": "nominal", "sort": order},
            "tooltip": [{"field": "client"}, {"field": "round"}, {"field": "stake"}],
        },
    }


def standing_plot(run: RunView, order: list[str]) -> Spec:
    """Map clients by rounds: accepted, set apart or rejected."""
    values = [
        {"round": r.number, "client": c.client, "standing": c.standing, "reason": c.reason}
        for r in run.rounds
        for c in r.clients
    ]
    return _grid(
        "Who was accepted, set apart or rejected",
        values,
        order,
        {"field": "standing", "type": "nominal", "scale": _scale(STANDINGS, STANDING_COLOURS)},
        [{"field": "client"}, {"field": "round"}, {"field": "standing"}, {"field": "reason"}],
    )


def committee_plot(run: RunView, order: list[str]) -> Spec:
    """Committee membership over the rounds: validators, miners, or both."""
    values = []
    for r in run.rounds:
        for client in dict.fromkeys((*r.validators, *r.miners)):
            role = ROLES[2] if client in r.validators and client in r.miners else None
            role = role or (ROLES[0] if client in r.validators else ROLES[1])
            values.append({"round": r.number, "client": client, "role": role})
    return _grid(
        "Committee membership",
        values,
        order,
        {"field": "role", "type": "nominal", "scale": _scale(ROLES, ROLE_COLOURS)},
        [{"field": "client"}, {"field": "round"}, {"field": "role"}],
    )


def _scale(domain: tuple[str, ...], colours: tuple[str, ...]) -> Spec:
    return {"domain": list(domain), "range": list(colours)}


def _grid(
    title: str, values: list[Spec], clients: list[str], colour: Spec, tooltip: list[Spec]
) -> Spec:
    return {
        "$schema": SCHEMA,
        "title": title,
        "data": {"values": values},
        "mark": {"type": "rect", "stroke": "white"},
        "width": {"step": 28},
        "height": {"step": 16},
        "encoding": {
            "x": {"field": "round", "type": "ordinal"},
            "y": {"field": "client", "type": "ordinal", "sort": clients},
            "color": colour,
            "tooltip": tooltip,
        },
    }
