"""Calibrate cosine screening on real MNIST updates: which rule finds label flippers.

Trains every partition's local model for a few rounds (both on its clean labels and on
flipped labels ``y -> 9 - y``), then replays each screening rule on federations with
0, 10, 30 and 50% attackers built from those updates, and prints how many attacker
updates each rule caught (tp), how many honest updates it rejected (fp) and how many
attacker updates it let through (fn), summed over the rounds.

The global model follows the honest clients' mean, as it would under a screening rule
that works, so later rounds show the regime where honest updates are small.

Usage::

    python sim/screening_calibration.py --rounds 4 --clients 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bcsfl_flower.screening import center_updates, cosine_similarity_matrix, screen_updates
from bcsfl_flower.task.attacks import choose_attackers
from bcsfl_flower.task.data import load_client_data
from bcsfl_flower.task.models import build_model
from bcsfl_flower.task.training import train

RULES = {
    "paper: raw cosine, tau 0.7": {"centering": "none", "tau": 0.7, "majority_fallback": False},
    "raw cosine, tau 0.7, majority fallback": {
        "centering": "none",
        "tau": 0.7,
        "majority_fallback": True,
    },
    "median-centred, tau 0": {"centering": "median", "tau": 0.0, "majority_fallback": False},
    "median-centred, tau 0, majority fallback (default)": {
        "centering": "median",
        "tau": 0.0,
        "majority_fallback": True,
    },
}
FRACTIONS = (0.0, 0.1, 0.3, 0.5)


def local_updates(
    data_dir: Path, clients: int, rounds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return, per round, the (clean, flipped) update matrices of every client."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    weights = {k: v.clone() for k, v in build_model("mnist").state_dict().items()}
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
        pair = ([], [])
        honest_states = []
        for data, bad in zip(clean, flipped, strict=True):
            for loader, bucket in ((data.train, pair[0]), (bad, pair[1])):
                model = build_model("mnist")
                model.load_state_dict(weights)
                train(model, loader, epochs=1, learning_rate=0.05, device=torch.device("cpu"))
                state = model.state_dict()
                bucket.append(
                    np.concatenate([(state[k] - weights[k]).numpy().ravel() for k in sorted(state)])
                )
                if bucket is pair[0]:
                    honest_states.append(state)
        history.append((np.stack(pair[0]), np.stack(pair[1])))
        weights = {k: torch.stack([s[k] for s in honest_states]).mean(0) for k in weights}
    return history


def _mixed_updates(honest: np.ndarray, flipped: np.ndarray, attackers) -> np.ndarray:
    """Return the round's updates with the attackers' rows taken from the flipped run."""
    rows = np.array([i in attackers for i in range(len(honest))])
    return np.where(rows[:, None], flipped, honest)


def score(history, clients: int, seed: int, rule: dict) -> list[tuple[int, int, int]]:
    """Return (tp, fp, fn) per attacker fraction for one screening rule."""
    rows = []
    for fraction in FRACTIONS:
        attackers = choose_attackers(clients, fraction, seed)
        tp = fp = fn = 0
        for honest, flipped in history:
            updates = _mixed_updates(honest, flipped, attackers)
            similarity = cosine_similarity_matrix(center_updates(updates, rule["centering"]))
            result = screen_updates(
                similarity, rule["tau"], majority_fallback=rule["majority_fallback"]
            )
            rejected = set(result.rejected)
            tp += len(rejected & attackers)
            fp += len(rejected - attackers)
            fn += len(attackers - rejected)
        rows.append((tp, fp, fn))
    return rows


def group_similarity(history, clients: int, seed: int, fraction: float) -> list[tuple]:
    """Return, per round, the mean cosine of median-centred updates within and across groups.

    Each entry is (attacker-attacker, honest-honest, honest-attacker), off-diagonal pairs
    only: what a screening rule would have to separate.
    """
    attackers = sorted(choose_attackers(clients, fraction, seed))
    honest = [i for i in range(clients) if i not in attackers]
    rows = []
    for honest_updates, flipped in history:
        updates = _mixed_updates(honest_updates, flipped, attackers)
        similarity = cosine_similarity_matrix(center_updates(updates, "median"))
        rows.append(
            (
                _mean_pairs(similarity, attackers, attackers),
                _mean_pairs(similarity, honest, honest),
                _mean_pairs(similarity, honest, attackers),
            )
        )
    return rows


def _mean_pairs(similarity: np.ndarray, rows: list[int], cols: list[int]) -> float:
    """Mean of ``similarity[rows, cols]``, leaving out the diagonal when rows is cols."""
    block = similarity[np.ix_(rows, cols)]
    if rows is cols:
        block = block[~np.eye(len(rows), dtype=bool)]
    return float(block.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    started = time.perf_counter()
    history = local_updates(args.data_dir.resolve(), args.clients, args.rounds, args.seed)
    print(
        f"trained {2 * args.clients * args.rounds} local models in "
        f"{time.perf_counter() - started:.0f}s; counts summed over {args.rounds} rounds\n"
    )
    header = " | ".join(f"{int(f * 100)}% attackers tp/fp/fn" for f in FRACTIONS)
    print(f"| rule | {header} |")
    print("|---" * (len(FRACTIONS) + 1) + "|")
    for name, rule in RULES.items():
        cells = " | ".join(
            f"{tp}/{fp}/{fn}" for tp, fp, fn in score(history, args.clients, args.seed, rule)
        )
        print(f"| {name} | {cells} |")
    print(
        "\nmean cosine of median-centred updates at 30% attackers "
        "(attacker-attacker / honest-honest / across):"
    )
    for number, (aa, hh, ha) in enumerate(
        group_similarity(history, args.clients, args.seed, 0.3), start=1
    ):
        print(f"round {number}: {aa:+.2f} / {hh:+.2f} / {ha:+.2f}")


if __name__ == "__main__":
    main()
