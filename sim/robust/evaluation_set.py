"""The sealed evaluation set: configurations drawn once, before any tuning, by a fixed seed.

The bench's presets (:data:`sim.robust_bench.PRESETS`) are the *tuning set*: constants
of the decision rule may be chosen on them. The README and the docs report this set
instead, which nobody may tune on. It is drawn by :func:`draw_configurations` from
:data:`EVALUATION_SEED`; the seed, the ranges and the draw itself
(``sim/results/evaluation/configurations.json``) were committed before any constant was
chosen against them, and a test holds the committed file to a fresh draw, so the set
cannot be redrawn quietly.

Each configuration fixes a model, a skew, a federation size, the clients' local
training (learning rate, epochs, batch size, a per-client training subsample) and an
attack with its attacker share; it is run with every contender on three seeds of its
own (never the tuning seeds 42-44).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sim.robust.federation import Cell

EVALUATION_SEED = 20261207
"""Seed of the one draw of the evaluation set (the day it was drawn)."""

NUM_CONFIGURATIONS = 48
"""How many configurations are drawn (the issue asks for at least 40)."""

SEEDS_PER_CONFIGURATION = 3
"""Federation seeds per configuration (partition, attackers, initial model, training)."""

MODELS = ("logreg", "mlp", "cnn")
ALPHAS: tuple[float | None, ...] = (0.05, 0.1, 0.3, 1.0, None)
"""Dirichlet label skews; ``None`` is an IID split."""
SHARES = (0.0, 0.2, 0.3)
BATCH_SIZES = (16, 32, 64)

EVALUATION_ATTACKS = (
    # byzfl's model-poisoning attacks and the data-poisoning ones
    "label-flip",
    "alie",
    "ipm-0.1",
    "ipm-2",
    "opt-alie",
    "opt-ipm",
    "mimic",
    "inf",
    "sign-flip",
    "gaussian",
    "on-off",
    # attacks adapted to BCSFL's own rule
    "noisy-copies",
    "own-deviation",
    "median-norm",
    "min-max",
    "min-sum",
    "decision-optimiser",
    "sleeper",
    "validators-reject",
    "validators-withhold",
    "validators-own-group",
    "mimic-set-apart",
    # backdoors
    "backdoor",
    "dba",
    "backdoor-projected",
)
"""Every attack the evaluation draws from (see :mod:`sim.robust.attacks`)."""

CLIENTS = {"logreg": (10, 50), "mlp": (10, 50), "cnn": (10, 20)}
"""Federation size range per model (inclusive); the CNN's is what two cores carry."""

ROUNDS = {"logreg": 20, "mlp": 20, "cnn": 8}
"""Rounds per model."""

TRAIN_CAPS = {"logreg": (None, 1000, 500), "mlp": (1000, 500, 250), "cnn": (500, 300)}
"""Per-client training subsample choices per model (``None``: the whole shard)."""


@dataclass(frozen=True)
class Configuration:
    """One configuration of the evaluation set.

    Attributes
    ----------
    name : str
        ``e01`` ... ``e48``, stable run-id prefix.
    model, alpha, clients, rounds, max_train
        The federation (``alpha`` None: IID; ``max_train`` None: whole shards).
    learning_rate, epochs, batch_size
        Every client's local SGD.
    share, attack
        Attacker share (0: clean) and the attack (``"clean"`` when the share is 0).
    seeds
        Its own federation seeds.
    """

    name: str
    model: str
    alpha: float | None
    clients: int
    rounds: int
    max_train: int | None
    learning_rate: float
    epochs: int
    batch_size: int
    share: float
    attack: str
    seeds: tuple[int, ...]

    def cells(self, contenders: tuple[str, ...]) -> list[Cell]:
        """Return the configuration's bench cells: every contender on every seed."""
        return [
            Cell(
                self.model,
                self.alpha,
                self.attack,
                self.share,
                contender,
                seed,
                rounds=self.rounds,
                clients=self.clients,
                max_train=self.max_train,
                learning_rate=self.learning_rate,
                epochs=self.epochs,
                batch_size=self.batch_size,
            )
            for seed in self.seeds
            for contender in contenders
        ]


def draw_configurations(
    seed: int = EVALUATION_SEED, count: int = NUM_CONFIGURATIONS
) -> list[Configuration]:
    """Draw the evaluation set from ``seed`` (the same seed always gives the same set)."""
    rng = np.random.default_rng(seed)
    configurations = []
    for index in range(1, count + 1):
        model = str(rng.choice(MODELS))
        low, high = CLIENTS[model]
        share = float(rng.choice(SHARES))
        caps = TRAIN_CAPS[model]
        cap = caps[int(rng.integers(len(caps)))]
        configurations.append(
            Configuration(
                name=f"e{index:02d}",
                model=model,
                alpha=ALPHAS[int(rng.integers(len(ALPHAS)))],
                clients=int(rng.integers(low, high + 1)),
                rounds=ROUNDS[model],
                max_train=None if cap is None else int(cap),
                learning_rate=round(float(np.exp(rng.uniform(np.log(0.01), np.log(0.2)))), 4),
                epochs=int(rng.integers(1, 4)),
                batch_size=int(rng.choice(BATCH_SIZES)),
                share=share,
                attack="clean" if share == 0 else str(rng.choice(EVALUATION_ATTACKS)),
                seeds=tuple(
                    int(s) for s in rng.integers(1_000, 1_000_000, SEEDS_PER_CONFIGURATION)
                ),
            )
        )
    return configurations


def write_configurations(path: Path, configurations: list[Configuration]) -> None:
    """Write the drawn set as JSON (with the seed that drew it)."""
    payload = {
        "seed": EVALUATION_SEED,
        "drawn_by": "python -m sim.robust.evaluation_set",
        "configurations": [asdict(c) for c in configurations],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def load_configurations(path: Path) -> list[Configuration]:
    """Read a drawn set back."""
    payload = json.loads(path.read_text())
    return [Configuration(**{**c, "seeds": tuple(c["seeds"])}) for c in payload["configurations"]]


SEALED_PATH = Path(__file__).resolve().parents[1] / "results" / "evaluation" / "configurations.json"
"""Where the committed draw lives."""


if __name__ == "__main__":
    write_configurations(SEALED_PATH, draw_configurations())
    print(f"wrote {SEALED_PATH}")
