"""The sealed evaluation set's report: every objective per configuration, and the verdicts.

A configuration is *lost* when any of its objectives fails, with no tolerance beyond
the issue's own bounds:

- accuracy: clean, BCSFL at most 2 points under FedAvg; attacked, at most 3 points
  under the best baseline (backdoors: their clean accuracy within 1 point of FedAvg's
  at alpha >= 0.3 and IID);
- backdoor success: at alpha >= 0.3 and IID at most 5%; at alpha <= 0.1 at most 20% and
  no more than the lowest baseline's;
- honest exclusion: at most 10% of the honest clients left out per round, on average
  over a configuration's rounds;
- stakes: no stake above 3x the median (clean);
- liveness: at most 2 rollbacks in any run.

Figures are means over the seeds that every contender of the configuration ran, except
rollbacks (the largest of any run). The headline figures are the median and the worst
of each over the configurations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.robust.evaluation_set import Configuration
from sim.robust.objectives import (
    ATTACK_GAP,
    BACKDOOR_ACCURACY_GAP,
    BACKDOOR_MILD,
    BACKDOOR_SKEWED,
    CLEAN_GAP,
    CLEAN_MEDIAN_GAP,
    DISTINCT_VALIDATORS,
    HONEST_EXCLUDED,
    HONEST_EXCLUDED_MEAN,
    ROLLBACKS,
    STAKE_RATIO,
)
from sim.robust.report import load_runs, on_common_seeds, summarise


@dataclass(frozen=True)
class Verdict:
    """One configuration's figures and the objectives it failed."""

    configuration: Configuration
    seeds: int
    accuracy: dict[str, float]
    backdoor: dict[str, float]
    honest_excluded: float | None
    stake_ratio: float | None
    rollbacks: int | None
    validators: float | None = None
    failures: tuple[str, ...] = field(default=())

    @property
    def lost(self) -> bool:
        """Whether any objective failed."""
        return bool(self.failures)


def _matches(row: dict[str, Any], configuration: Configuration) -> bool:
    keys = ("model", "alpha", "clients", "rounds", "max_train", "learning_rate", "epochs")
    return (
        all(row[k] == getattr(configuration, k) for k in keys)
        and row["batch_size"] == configuration.batch_size
        and row["attack"] == configuration.attack
        and row["share"] == configuration.share
        and row["seed"] in configuration.seeds
    )


def judge(configuration: Configuration, rows: list[dict[str, Any]]) -> Verdict | None:
    """Return the configuration's verdict, or None until BCSFL and a baseline both ran."""
    rows = on_common_seeds([r for r in rows if _matches(r, configuration)])
    contenders = sorted({r["strategy"] for r in rows})
    if "bcsfl" not in contenders or len(contenders) < 2:
        return None
    accuracy = {
        c: float(np.mean([r["accuracy"] for r in rows if r["strategy"] == c])) for c in contenders
    }
    backdoor = {
        c: float(np.mean([r["backdoor"] for r in rows if r["strategy"] == c]))
        for c in contenders
        if all(r["backdoor"] is not None for r in rows if r["strategy"] == c)
    }
    ours = [r for r in rows if r["strategy"] == "bcsfl"]
    honest = float(np.mean([r["honest_rejected"] for r in ours]))
    stake_ratio = float(np.mean([r["honest_max_to_median"] for r in ours]))
    rollbacks = max(r["rollbacks"] for r in ours)
    verdict = Verdict(
        configuration,
        len({r["seed"] for r in ours}),
        accuracy,
        backdoor,
        honest,
        stake_ratio,
        rollbacks,
        validators=float(np.mean([r["validators"] for r in ours])),
    )
    return Verdict(**{**verdict.__dict__, "failures": _failures(verdict)})


def _failures(verdict: Verdict) -> tuple[str, ...]:
    configuration = verdict.configuration
    ours = verdict.accuracy["bcsfl"]
    baselines = {c: v for c, v in verdict.accuracy.items() if c != "bcsfl"}
    failures = []
    if configuration.share == 0:
        if "fedavg" in baselines and ours - baselines["fedavg"] < CLEAN_GAP:
            failures.append(f"accuracy {100 * (ours - baselines['fedavg']):+.1f} pt vs FedAvg")
        if verdict.stake_ratio is not None and verdict.stake_ratio > STAKE_RATIO:
            failures.append(f"stake {verdict.stake_ratio:.1f}x the median")
    elif verdict.backdoor:
        failures += _backdoor_failures(verdict)
    else:
        best = max(baselines, key=lambda c: baselines[c])
        if ours - baselines[best] < ATTACK_GAP:
            failures.append(f"accuracy {100 * (ours - baselines[best]):+.1f} pt vs {best}")
    if verdict.honest_excluded is not None and verdict.honest_excluded > HONEST_EXCLUDED:
        failures.append(f"{verdict.honest_excluded:.0%} honest excluded per round")
    if verdict.rollbacks is not None and verdict.rollbacks > ROLLBACKS:
        failures.append(f"{verdict.rollbacks} rollbacks")
    served = verdict.validators
    if (
        configuration.share == 0
        and configuration.clients >= 20
        and configuration.rounds >= 20
        and served is not None
        and served < DISTINCT_VALIDATORS
    ):
        failures.append(f"{served:.0f} distinct validators")
    return tuple(failures)


def _backdoor_failures(verdict: Verdict) -> list[str]:
    configuration = verdict.configuration
    success = verdict.backdoor.get("bcsfl", 1.0)
    others = {c: v for c, v in verdict.backdoor.items() if c != "bcsfl"}
    failures = []
    skewed = configuration.alpha is not None and configuration.alpha <= 0.1
    if skewed:
        lowest = min(others.values(), default=1.0)
        if success > min(BACKDOOR_SKEWED, lowest):
            failures.append(f"backdoor success {success:.1%} (lowest baseline {lowest:.1%})")
    else:
        if success > BACKDOOR_MILD:
            failures.append(f"backdoor success {success:.1%}")
        fedavg = verdict.accuracy.get("fedavg")
        if fedavg is not None and verdict.accuracy["bcsfl"] - fedavg < BACKDOOR_ACCURACY_GAP:
            gap = 100 * (verdict.accuracy["bcsfl"] - fedavg)
            failures.append(f"accuracy {gap:+.1f} pt vs FedAvg")
    return failures


def _skew(alpha: float | None) -> str:
    return "iid" if alpha is None else f"{alpha:g}"


def verdict_table(verdicts: Sequence[Verdict]) -> list[str]:
    """Return one line per judged configuration."""
    lines = [
        "| config | model | alpha | clients | lr | epochs | batch | attackers | attack | "
        "BCSFL | FedAvg | best baseline | backdoor (BCSFL / lowest baseline) | "
        "honest excluded | stake max/median | rollbacks | validators | seeds | lost: why |",
        "|---" * 19 + "|",
    ]
    for verdict in verdicts:
        c = verdict.configuration
        baselines = {k: v for k, v in verdict.accuracy.items() if k != "bcsfl"}
        best = max(baselines, key=lambda k: baselines[k])
        fedavg = verdict.accuracy.get("fedavg", float("nan"))
        backdoor = "-"
        if verdict.backdoor:
            lowest = min((v for k, v in verdict.backdoor.items() if k != "bcsfl"), default=None)
            backdoor = f"{verdict.backdoor.get('bcsfl', float('nan')):.3f} / " + (
                "-" if lowest is None else f"{lowest:.3f}"
            )
        lines.append(
            f"| {c.name} | {c.model} | {_skew(c.alpha)} | {c.clients} | {c.learning_rate:g} | "
            f"{c.epochs} | {c.batch_size} | {c.share:.0%} | {c.attack} | "
            f"{verdict.accuracy['bcsfl']:.3f} | {fedavg:.3f} | "
            f"{best} {baselines[best]:.3f} | {backdoor} | {verdict.honest_excluded:.1%} | "
            f"{verdict.stake_ratio:.2f} | {verdict.rollbacks} | {verdict.validators:.0f} | "
            f"{verdict.seeds} | "
            f"{'; '.join(verdict.failures) or 'no'} |"
        )
    return lines


def headline(verdicts: Sequence[Verdict]) -> list[str]:
    """Return the median and worst of each figure, and the issue's set-wide bounds."""
    clean = [v for v in verdicts if v.configuration.share == 0 and "fedavg" in v.accuracy]
    gaps = [100 * (v.accuracy["bcsfl"] - v.accuracy["fedavg"]) for v in clean]
    excluded = [v.honest_excluded for v in verdicts if v.honest_excluded is not None]
    lost = [v for v in verdicts if v.lost]
    lines = [f"- configurations judged: {len(verdicts)}; lost: {len(lost)}"]
    if gaps:
        median = float(np.median(gaps))
        verdict = "met" if median >= 100 * CLEAN_MEDIAN_GAP else "NOT met"
        lines.append(
            f"- clean, BCSFL - FedAvg: median {median:+.1f} pt, worst {min(gaps):+.1f} pt "
            f"({len(gaps)} configurations; median >= {100 * CLEAN_MEDIAN_GAP:+.1f}: {verdict})"
        )
    if excluded:
        mean = float(np.mean(excluded))
        verdict = "met" if mean <= HONEST_EXCLUDED_MEAN else "NOT met"
        lines.append(
            f"- honest clients left out per round: mean {mean:.1%}, median "
            f"{float(np.median(excluded)):.1%}, worst {max(excluded):.1%} "
            f"(mean <= {HONEST_EXCLUDED_MEAN:.0%}: {verdict})"
        )
    attacked = [v for v in verdicts if v.configuration.share > 0]
    if attacked:
        gaps = [
            100 * (v.accuracy["bcsfl"] - max(a for k, a in v.accuracy.items() if k != "bcsfl"))
            for v in attacked
        ]
        lines.append(
            f"- attacked, BCSFL - best baseline: median {float(np.median(gaps)):+.1f} pt, "
            f"worst {min(gaps):+.1f} pt ({len(gaps)} configurations)"
        )
    return lines


def write_evaluation_report(
    directory: Path, configurations: Sequence[Configuration], contenders: Sequence[str]
) -> str:
    """Write ``table.md`` and ``verdicts.json`` for the sealed set's stored runs."""
    runs = load_runs(directory)
    rows = [summarise(run) for run in runs]
    verdicts = [v for c in configurations if (v := judge(c, rows)) is not None]
    versions = sorted({run.get("commit", "unknown") for run in runs})
    commands = sorted({run.get("command", "unknown") for run in runs})
    text = "\n".join(
        [
            "# The sealed evaluation set",
            "",
            "Configurations drawn once from seed 20261207 before any tuning "
            "(`sim/results/evaluation/configurations.json`); nothing was tuned on them.",
            "",
            f"Made by: {', '.join(f'`{c}`' for c in commands) or '-'}",
            f"Code versions: {', '.join(versions) or '-'}",
            f"Contenders: {', '.join(sorted({r['strategy'] for r in rows}))}",
            "",
            "## Headline",
            "",
            *headline(verdicts),
            "",
            "## Every configuration",
            "",
            *verdict_table(verdicts),
            "",
        ]
    )
    (directory / "table.md").write_text(text)
    (directory / "verdicts.json").write_text(
        json.dumps(
            [
                {
                    "configuration": v.configuration.name,
                    "lost": v.lost,
                    "failures": list(v.failures),
                    "accuracy": v.accuracy,
                    "backdoor": v.backdoor,
                    "honest_excluded": v.honest_excluded,
                    "stake_ratio": v.stake_ratio,
                    "rollbacks": v.rollbacks,
                    "distinct_validators": v.validators,
                    "seeds": v.seeds,
                }
                for v in verdicts
            ],
            indent=1,
        )
        + "\n"
    )
    return text
