"""Tables and a figure from the bench's stored runs.

Per cell the final test accuracy of every contender (mean over seeds); per model, skew
and attacker share the worst case over attacks (how the ByzFL benchmark ranks
defences); for BCSFL the honest and Byzantine rejection rates, rollbacks, the stakes'
Gini coefficient and largest-to-median ratio, and the distinct validators of a run; and
the backdoor's success rate.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.robust.objectives import ATTACK_GAP, BACKDOOR_MILD, BACKDOOR_SKEWED, CLEAN_GAP


def gini(values: Sequence[float]) -> float:
    """Return the Gini coefficient of non-negative ``values`` (0: equal; near 1: one holds all)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0 or x.sum() <= 0:
        return 0.0
    ranks = np.arange(1, x.size + 1)
    return float((2 * ranks - x.size - 1) @ x / (x.size * x.sum()))


def load_runs(directory: Path) -> list[dict[str, Any]]:
    """Return every stored run of ``directory/runs``."""
    return [json.loads(p.read_text()) for p in sorted((directory / "runs").glob("*.json"))]


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Return one run's figures: final accuracy, backdoor success and BCSFL's diagnostics."""
    cell, rounds = run["cell"], run["rounds"]
    num_byzantine = len(run["attackers"])
    num_honest = cell["clients"] - num_byzantine
    row = {
        **cell,
        "accuracy": rounds[-1]["accuracy"],
        "backdoor": rounds[-1]["backdoor_success"],
    }
    if rounds[-1]["committed"] is None:
        return row
    stakes = np.asarray(rounds[-1]["stakes"])
    honest_stakes = np.delete(stakes, run["attackers"])
    row.update(
        honest_rejected=float(np.mean([r["honest_rejected"] for r in rounds])) / num_honest,
        byzantine_rejected=(
            float(np.mean([r["byzantine_rejected"] for r in rounds])) / num_byzantine
            if num_byzantine
            else None
        ),
        rollbacks=sum(1 for r in rounds if not r["committed"]),
        gini=gini(stakes),
        max_to_median=float(stakes.max() / max(np.median(stakes), 1e-12)),
        honest_max_to_median=float(honest_stakes.max() / max(np.median(honest_stakes), 1e-12)),
        validators=len({v for r in rounds for v in r["validators"]}),
    )
    return row


def _skew(alpha: float | None) -> str:
    return "iid" if alpha is None else f"alpha {alpha:g}"


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _group(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups


def accuracy_table(rows: list[dict[str, Any]], contenders: Sequence[str]) -> list[str]:
    """Return the per-cell accuracy table: means over the seeds every contender ran there.

    A resumed bench has some contenders on more seeds than others; a mean over
    different seeds would compare different federations.
    """
    lines = [
        "| model | skew | attackers | attack | " + " | ".join(contenders) + " | seeds |",
        "|---" * (len(contenders) + 5) + "|",
    ]
    cells = _group(rows, "model", "alpha", "share", "attack")
    for (model, alpha, share, attack), members in sorted(cells.items(), key=_cell_order):
        members = on_common_seeds(members)
        means = {c: _mean(r["accuracy"] for r in members if r["strategy"] == c) for c in contenders}
        seeds = len({r["seed"] for r in members})
        lines.append(
            f"| {model} | {_skew(alpha)} | {share:.0%} | {attack} | "
            + " | ".join(_fmt(means[c]) for c in contenders)
            + f" | {seeds} |"
        )
    return lines


def on_common_seeds(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the runs on the seeds that every contender of the cell ran."""
    by_contender: dict[str, set[int]] = {}
    for run in members:
        by_contender.setdefault(run["strategy"], set()).add(run["seed"])
    common = set.intersection(*by_contender.values()) if by_contender else set()
    return [run for run in members if run["seed"] in common]


def _cell_order(item: tuple) -> tuple:
    (model, alpha, share, attack), _ = item
    return (model, -1.0 if alpha is None else alpha, share, attack)


def worst_cases(rows: list[dict[str, Any]], contenders: Sequence[str]) -> dict[tuple, dict]:
    """Return ``{(model, alpha, share): {contender: (worst mean accuracy, attack)}}``."""
    out: dict[tuple, dict] = {}
    for key, members in _group(
        [r for r in rows if r["share"] > 0], "model", "alpha", "share"
    ).items():
        seeds = {r["seed"] for r in members if r["strategy"] == "bcsfl"}
        if seeds:  # compare on the seeds BCSFL ran
            members = [r for r in members if r["seed"] in seeds]
        per = {}
        for contender in contenders:
            by_attack = {
                attack: _mean(r["accuracy"] for r in m if r["strategy"] == contender)
                for (attack,), m in _group(members, "attack").items()
            }
            scored = [(acc, attack) for attack, acc in by_attack.items() if acc is not None]
            if scored:
                per[contender] = min(scored)
        out[key] = per
    return out


def worst_backdoor(
    rows: list[dict[str, Any]], key: tuple, contender: str
) -> tuple[float, str] | None:
    """Return the contender's highest mean backdoor success in a group, and its attack."""
    model, alpha, share = key
    members = [
        r
        for r in rows
        if (r["model"], r["alpha"], r["share"], r["strategy"]) == (model, alpha, share, contender)
        and r["backdoor"] is not None
    ]
    scored = [
        (float(np.mean([r["backdoor"] for r in m])), attack)
        for (attack,), m in _group(members, "attack").items()
    ]
    return max(scored) if scored else None


def worst_case_table(rows: list[dict[str, Any]], contenders: Sequence[str]) -> list[str]:
    """Return the worst case over attacks per model, skew and share.

    Accuracy alone would call a group held where a backdoor succeeds with the main task
    intact, so a contender's worst backdoor success above :data:`BACKDOOR_MILD` is
    printed beside its worst accuracy.
    """
    lines = [
        "| model | skew | attackers | " + " | ".join(contenders) + " |",
        "|---" * (len(contenders) + 3) + "|",
    ]
    for (model, alpha, share), per in sorted(
        worst_cases(rows, contenders).items(),
        key=lambda i: (i[0][0], -1 if i[0][1] is None else i[0][1], i[0][2]),
    ):
        cells = []
        for contender in contenders:
            if contender not in per:
                cells.append("-")
                continue
            text = f"{per[contender][0]:.3f} ({per[contender][1]})"
            backdoor = worst_backdoor(rows, (model, alpha, share), contender)
            if backdoor is not None and backdoor[0] > BACKDOOR_MILD:
                text += f"; {backdoor[1]} succeeds {backdoor[0]:.0%}"
            cells.append(text)
        lines.append(f"| {model} | {_skew(alpha)} | {share:.0%} | " + " | ".join(cells) + " |")
    return lines


def gap_table(rows: list[dict[str, Any]], contenders: Sequence[str]) -> list[str]:
    """Return BCSFL against the best baseline of each cell (FedAvg in clean cells).

    The verdict uses the sealed set's objectives (:mod:`sim.robust.evaluation_report`),
    backdoor success included, and names every loss: a cell is never "met" by a
    tolerance. Means over the seeds BCSFL ran.
    """
    lines = [
        "| model | skew | attackers | attack | BCSFL | best baseline | gap (points) | "
        "BCSFL backdoor success | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = [c for c in contenders if c != "bcsfl"]
    cells = _group(rows, "model", "alpha", "share", "attack")
    for (model, alpha, share, attack), members in sorted(cells.items(), key=_cell_order):
        seeds = {r["seed"] for r in members if r["strategy"] == "bcsfl"}
        members = [r for r in members if r["seed"] in seeds]  # compare on the same seeds
        ours = _mean(r["accuracy"] for r in members if r["strategy"] == "bcsfl")
        pool = ["fedavg"] if share == 0 else baselines
        theirs = {c: _mean(r["accuracy"] for r in members if r["strategy"] == c) for c in pool}
        theirs = {c: v for c, v in theirs.items() if v is not None}
        if ours is None or not theirs:
            continue
        best = max(theirs, key=lambda c: theirs[c])
        gap = 100 * (ours - theirs[best])
        backdoor = _mean(r["backdoor"] for r in members if r["strategy"] == "bcsfl")
        reasons = []
        if gap < 100 * (CLEAN_GAP if share == 0 else ATTACK_GAP):
            reasons.append(f"accuracy {gap:+.1f} pt")
        if backdoor is not None and backdoor > _backdoor_bound(alpha, members):
            reasons.append(f"backdoor {backdoor:.1%}")
        verdict = "lost: " + ", ".join(reasons) if reasons else f"held ({gap:+.1f} pt)"
        lines.append(
            f"| {model} | {_skew(alpha)} | {share:.0%} | {attack} | {ours:.3f} | "
            f"{best} {theirs[best]:.3f} | {gap:+.1f} | {_fmt(backdoor)} | {verdict} |"
        )
    return lines


def _backdoor_bound(alpha: float | None, members: list[dict[str, Any]]) -> float:
    """Return the backdoor success a cell allows BCSFL (see the evaluation's objectives)."""
    if alpha is not None and alpha <= 0.1:
        others = [r["backdoor"] for r in members if r["strategy"] != "bcsfl" and r["backdoor"]]
        return min([BACKDOOR_SKEWED, *others])
    return BACKDOOR_MILD


def bcsfl_table(rows: list[dict[str, Any]]) -> list[str]:
    """Return BCSFL's diagnostics per cell (means over seeds; rollbacks: the largest)."""
    lines = [
        "| model | skew | attackers | attack | accuracy | honest rejected/round | "
        "Byzantine rejected/round | rollbacks (max) | stake Gini | max/median stake | "
        "distinct validators | seeds |",
        "|---" * 12 + "|",
    ]
    bcsfl = [r for r in rows if r["strategy"] == "bcsfl" and "rollbacks" in r]
    for (model, alpha, share, attack), members in sorted(
        _group(bcsfl, "model", "alpha", "share", "attack").items(), key=_cell_order
    ):
        byz = _mean(r["byzantine_rejected"] for r in members)
        lines.append(
            f"| {model} | {_skew(alpha)} | {share:.0%} | {attack} | "
            f"{_fmt(_mean(r['accuracy'] for r in members))} | "
            f"{_mean(r['honest_rejected'] for r in members):.1%} | "
            f"{'-' if byz is None else f'{byz:.1%}'} | "
            f"{max(r['rollbacks'] for r in members)} | "
            f"{_mean(r['gini'] for r in members):.3f} | "
            f"{_mean(r['max_to_median'] for r in members):.2f} | "
            f"{_mean(r['validators'] for r in members):.1f} | {len(members)} |"
        )
    return lines


def backdoor_table(rows: list[dict[str, Any]], contenders: Sequence[str]) -> list[str]:
    """Return the backdoors' success rate per contender (mean over seeds)."""
    lines = [
        "| model | skew | attackers | attack | " + " | ".join(contenders) + " |",
        "|---" * (len(contenders) + 4) + "|",
    ]
    backdoor = [r for r in rows if r["backdoor"] is not None]
    for (model, alpha, share, attack), members in sorted(
        _group(backdoor, "model", "alpha", "share", "attack").items(), key=_cell_order
    ):
        cells = [
            _fmt(_mean(r["backdoor"] for r in members if r["strategy"] == c)) for c in contenders
        ]
        lines.append(
            f"| {model} | {_skew(alpha)} | {share:.0%} | {attack} | " + " | ".join(cells) + " |"
        )
    return lines


def figure(rows: list[dict[str, Any]], contenders: Sequence[str], path: Path) -> None:
    """Plot the worst case over attacks per contender, one panel per model and share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = worst_cases(rows, contenders)
    panels = sorted({(k[0], k[2]) for k in worst})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (model, share) in zip(axes[0], panels, strict=True):
        skews = sorted(
            {k[1] for k in worst if k[0] == model and k[2] == share},
            key=lambda a: -1 if a is None else a,
        )
        width = 0.8 / max(1, len(contenders))
        for i, contender in enumerate(contenders):
            values = [worst[(model, a, share)].get(contender, (np.nan, ""))[0] for a in skews]
            ax.bar(np.arange(len(skews)) + i * width, values, width, label=contender)
        ax.set_xticks(np.arange(len(skews)) + 0.4 - width / 2, [_skew(a) for a in skews])
        ax.set_ylim(0, 1)
        ax.set_title(f"{model}, {share:.0%} attackers: worst case over attacks")
        ax.set_ylabel("final test accuracy")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(directory: Path, contenders: Sequence[str], made_by: str) -> str:
    """Write ``table.md``, ``summary.csv`` and ``worst_case.png`` in ``directory``."""
    rows = [summarise(run) for run in load_runs(directory)]
    present = [c for c in contenders if any(r["strategy"] == c for r in rows)]
    sections = [
        "# Fast decision-quality bench",
        "",
        f"Made by: `{made_by}`",
        "",
        "## Final test accuracy (mean over the seeds every contender ran)",
        "",
        *accuracy_table(rows, present),
        "",
        "## Worst case over attacks",
        "",
        *worst_case_table(rows, present),
        "",
        "## BCSFL against the best baseline of each cell",
        "",
        *gap_table(rows, present),
        "",
        "## BCSFL's decisions",
        "",
        *bcsfl_table(rows),
        "",
        "## Backdoor success rate (triggered test images classified as the target)",
        "",
        *backdoor_table(rows, present),
        "",
    ]
    text = "\n".join(sections)
    (directory / "table.md").write_text(text)
    keys = sorted({k for r in rows for k in r})
    csv = [",".join(keys)] + [
        ",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in rows
    ]
    (directory / "summary.csv").write_text("\n".join(csv) + "\n")
    figure(rows, present, directory / "worst_case.png")
    return text
