"""Calibrate screening on real MNIST updates: which features and rule find the attackers.

Trains every partition's local model for a few rounds, both on its clean labels and on
flipped labels ``y -> 9 - y``, then replays each screening rule on federations built
from those updates: label flipping at 0, 10, 30 and 50% attackers, label flipping at
50% with the attackers holding a third of the stake, and sign-flip (x4), Gaussian noise
(x10) and scaling (x10) at 30%. It prints, per rule and cell, the attacker updates each
rule caught (tp), the honest updates it rejected (fp) and the attacker updates it let
through (fn), summed over rounds and seeds, and the honest rejection rate at 0%
attackers. The global model follows the honest clients' mean, as it would under a
screening rule that works.

Rules compared (see "Screening" in docs/round.md for the numbers):

* ``BCSFL (shipped)``: :func:`bcsfl_flower.round.screening.screen_updates` on the Gram
  matrix, i.e. the length test, then average linkage on the mean-centred unit updates
  with the stake-majority descent;
* ``FLAME``: scikit-learn's HDBSCAN on the cosine distances of the whole updates with
  ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``, ``allow_single_cluster``;
  the largest cluster is kept;
* the shipped direction test on other features: raw (uncentred) whole updates,
  median-centred whole updates, and the output layer alone (LFighter's features).

Usage::

    python sim/screening_calibration.py --rounds 5 --clients 20 --seeds 42 43 44
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import HDBSCAN
from torch.utils.data import DataLoader, TensorDataset

from bcsfl_flower.round.bounds import bound_updates
from bcsfl_flower.round.screening import (
    OUTLIER_NORM_RATIO,
    TRUSTED_STAKE_SHARE,
    centred_cosines,
    majority_cluster,
    screen_updates,
    split_threshold,
    unit_gram,
)
from bcsfl_vision.task.attacks import choose_attackers
from bcsfl_vision.task.data import load_client_data
from bcsfl_vision.task.models import build_model
from bcsfl_vision.task.training import train

Rule = Callable[[np.ndarray, np.ndarray, slice], set[int]]
"""``(updates, stakes, output-layer columns) -> rejected rows``."""

CELLS = (
    ("label-flip", 0.0, None),
    ("label-flip", 0.1, None),
    ("label-flip", 0.3, None),
    ("label-flip", 0.5, None),
    ("label-flip", 0.5, 1 / 3),
    ("sign-flip", 0.3, None),
    ("gaussian-noise", 0.3, None),
    ("scale", 0.3, None),
)
"""(attack, attacker fraction, attackers' share of the stake or None for equal stakes)."""


def local_updates(data_dir: Path, clients: int, rounds: int, seed: int):
    """Return per round the (clean, flipped) update matrices, and the output-layer columns."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    weights = {k: v.clone() for k, v in build_model("mnist").state_dict().items()}
    keys = list(weights)  # the model's own order: the output layer comes last
    clean = [
        load_client_data("mnist", data_dir, p, clients, alpha=0.5, seed=seed, batch_size=32)
        for p in range(clients)
    ]
    flipped = []
    for data in clean:
        images, labels = data.train.dataset.tensors
        flipped.append(
            DataLoader(
                TensorDataset(images, 9 - labels),
                batch_size=32,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
        )
    history = []
    for _ in range(rounds):
        pair: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        honest_states = []
        for data, bad in zip(clean, flipped, strict=True):
            for loader, bucket in ((data.train, pair[0]), (bad, pair[1])):
                model = build_model("mnist")
                model.load_state_dict(weights)
                train(model, loader, epochs=1, learning_rate=0.05, device=torch.device("cpu"))
                state = model.state_dict()
                bucket.append(
                    np.concatenate([(state[k] - weights[k]).numpy().ravel() for k in keys])
                )
                if bucket is pair[0]:
                    honest_states.append(state)
        history.append((np.stack(pair[0]), np.stack(pair[1])))
        weights = {k: torch.stack([s[k] for s in honest_states]).mean(0) for k in weights}
    sizes = [weights[k].numel() for k in keys]
    output = slice(sum(sizes[:-2]), sum(sizes))  # last weight matrix and its bias
    return history, output


def federation(honest, flipped, attackers, attack: str, rng: np.random.Generator) -> np.ndarray:
    """Return a round's updates with the attackers' rows replaced by their attack."""
    updates = honest.copy()
    for row in attackers:
        if attack == "label-flip":
            updates[row] = flipped[row]
        elif attack == "sign-flip":
            updates[row] = -4.0 * honest[row]
        elif attack == "gaussian-noise":
            updates[row] = rng.normal(0.0, 10.0 * honest[row].std(), honest[row].shape)
        else:
            updates[row] = 10.0 * honest[row]
    return updates


def shipped(updates: np.ndarray, stakes: np.ndarray, output: slice) -> set[int]:
    gram = updates.astype(np.float64) @ updates.T.astype(np.float64)
    bounds = bound_updates(np.sqrt(np.diag(gram)), np.full(len(updates), 100.0), stakes)
    return set(screen_updates(gram, bounds).rejected)


def direction_test(features: Callable[[np.ndarray, slice], np.ndarray], centre: bool) -> Rule:
    """Return the shipped length and direction tests, with the direction test on other features."""

    def rule(updates: np.ndarray, stakes: np.ndarray, output: slice) -> set[int]:
        norms = np.linalg.norm(updates, axis=1)
        bound = bound_updates(norms, np.ones(len(updates)), stakes).norm_bound
        rows = np.flatnonzero(norms <= OUTLIER_NORM_RATIO * bound)
        chosen = features(updates[rows].astype(np.float64), output)
        unit = unit_gram(chosen @ chosen.T)
        cosines = centred_cosines(unit) if centre else unit
        members = majority_cluster(cosines, unit, stakes[rows], split_threshold(rows.size)).members
        return set(range(len(updates))) - set(rows[members].tolist())

    return rule


def flame(updates: np.ndarray, stakes: np.ndarray, output: slice) -> set[int]:
    unit = updates / np.maximum(np.linalg.norm(updates, axis=1, keepdims=True), 1e-12)
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0).astype(np.float64)
    np.fill_diagonal(distances, 0.0)
    labels = HDBSCAN(
        metric="precomputed",
        min_cluster_size=len(updates) // 2 + 1,
        min_samples=1,
        allow_single_cluster=True,
        copy=True,
    ).fit_predict(distances)
    if np.all(labels < 0):
        return set()
    kept = np.bincount(labels[labels >= 0]).argmax()
    return set(np.flatnonzero(labels != kept).tolist())


RULES: dict[str, Rule] = {
    "BCSFL (shipped): length test + centred whole updates": shipped,
    "FLAME: HDBSCAN on cosine of whole updates": flame,
    "length test + raw whole updates (no centring)": direction_test(lambda u, o: u, False),
    "length test + median-centred whole updates": direction_test(
        lambda u, o: u - np.median(u, axis=0), False
    ),
    "length test + centred output layer (LFighter's features)": direction_test(
        lambda u, o: u[:, o], True
    ),
}


def stakes_for(clients: int, attackers: frozenset[int], share: float | None) -> np.ndarray:
    """Equal stakes, or the attackers holding ``share`` of the total."""
    stakes = np.ones(clients)
    if share is not None and attackers:
        honest = clients - len(attackers)
        stakes[list(attackers)] = share * honest / (len(attackers) * (1.0 - share))
    return stakes


def score(runs, clients: int, rule: Rule) -> list[tuple[int, int, int]]:
    """Return (tp, fp, fn) per cell for one rule, summed over seeds and rounds."""
    rows = []
    for attack, fraction, share in CELLS:
        tp = fp = fn = 0
        for seed, (history, output) in runs.items():
            attackers = choose_attackers(clients, fraction, seed)
            stakes = stakes_for(clients, attackers, share)
            rng = np.random.default_rng(seed)
            for honest, flipped in history:
                updates = federation(honest, flipped, attackers, attack, rng)
                rejected = rule(updates, stakes, output)
                tp += len(rejected & attackers)
                fp += len(rejected - attackers)
                fn += len(attackers - rejected)
        rows.append((tp, fp, fn))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    started = time.perf_counter()
    runs = {
        seed: local_updates(args.data_dir.resolve(), args.clients, args.rounds, seed)
        for seed in args.seeds
    }
    honest_updates = args.clients * args.rounds * len(args.seeds)
    print(
        f"trained {2 * honest_updates} local models in {time.perf_counter() - started:.0f} s "
        f"({args.clients} clients, {args.rounds} rounds, seeds {args.seeds}); counts are "
        f"summed over rounds and seeds; a stake cell's trusted side needs "
        f"{TRUSTED_STAKE_SHARE:.0%} of the stake\n"
    )
    header = " | ".join(
        f"{attack} {int(100 * fraction)}%" + (" (1/3 stake)" if share else "")
        for attack, fraction, share in CELLS
    )
    print(f"| rule | honest rejected at 0% | {header} |")
    print("|---" * (len(CELLS) + 2) + "|")
    for name, rule in RULES.items():
        rows = score(runs, args.clients, rule)
        false_positive_rate = rows[0][1] / honest_updates
        cells = " | ".join(f"{tp}/{fp}/{fn}" for tp, fp, fn in rows)
        print(f"| {name} | {false_positive_rate:.1%} | {cells} |")


if __name__ == "__main__":
    main()
