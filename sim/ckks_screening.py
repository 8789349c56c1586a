"""Does CKKS screening decide as plaintext screening does? The grid's label-flip 30% cell.

Runs the grid's label-flip 30% federation (MNIST, 20 clients, Dirichlet(0.5), 20 rounds,
seed 42) with ``ckks=true`` as a real ``flwr run``, and compares, round by round, the
partitions its screening rejected with those of the plaintext run of the same cell in
``sim/results/full``. In CKKS mode the server never sees an update: the screen works on
the Gram matrix the committee decrypts. The two runs train on the same data but are not
the same run (CKKS adds noise of about 1e-7 to every aggregate, and Flower's simulation
does not fix the order of replies), so the comparison is of decisions, not of models.

::

    python -m sim.ckks_screening --data-dir ../shared/data    # resumes a finished run

Writes ``sim/results/ckks/screening.md`` with the table and the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcsfl_vision.launch import run_federation
from bcsfl_vision.results import RESULTS_FILE
from sim.experiments import add_data_dir_argument
from sim.grid import LABEL_FLIP, ExperimentSpec

PLAINTEXT_SPEC = ExperimentSpec("bcsfl", LABEL_FLIP, 0.3)
"""The grid's label-flip 30% cell for BCSFL, seed 42."""


@dataclass(frozen=True)
class RoundComparison:
    """What both runs' screens rejected in one round (partition ids, ascending)."""

    round: int
    plaintext: tuple[int, ...] | None
    encrypted: tuple[int, ...] | None

    @property
    def same(self) -> bool:
        """Whether both rounds were screened and rejected the same partitions."""
        return self.plaintext is not None and self.plaintext == self.encrypted


def rejected_by_round(results: Mapping[str, Any]) -> dict[int, tuple[int, ...]]:
    """Return each trained round's rejected partitions from a ``results.json`` document."""
    return {
        int(key): tuple(sorted(record["rejected_partitions"]))
        for key, record in results["rounds"].items()
        if int(key) > 0 and "rejected_partitions" in record
    }


def compare(
    plaintext: Mapping[str, Any], encrypted: Mapping[str, Any], num_rounds: int
) -> list[RoundComparison]:
    """Return the per-round comparison of two runs' rejections."""
    first, second = rejected_by_round(plaintext), rejected_by_round(encrypted)
    return [
        RoundComparison(number, first.get(number), second.get(number))
        for number in range(1, num_rounds + 1)
    ]


def comparison_table(rows: Sequence[RoundComparison], attackers: Sequence[int]) -> str:
    """Return the Markdown report: the attackers, one row per round and the tally."""
    lines = [
        f"Attacking partitions: {', '.join(map(str, attackers))}.",
        "",
        "| round | rejected in plaintext | rejected with CKKS | same |",
        "|---:|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.round} | {_partitions(row.plaintext)} | {_partitions(row.encrypted)} "
            f"| {'yes' if row.same else 'no'} |"
        )
    lines += ["", f"Same decision in {sum(row.same for row in rows)} of {len(rows)} rounds."]
    return "\n".join(lines)


def _partitions(rejected: tuple[int, ...] | None) -> str:
    if rejected is None:
        return "—"
    return ", ".join(map(str, rejected)) if rejected else "none"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sim.ckks_screening", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("sim/results/ckks"))
    parser.add_argument("--plaintext", type=Path, default=Path("sim/results/full/runs"))
    add_data_dir_argument(parser)
    parser.add_argument("--timeout", type=float, default=7200.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or reuse) the CKKS federation and write the comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    # Under runs/, as the grid's runs, so that models and Flower's home stay out of git.
    run_dir = args.out / "runs" / PLAINTEXT_SPEC.run_id.replace("bcsfl", "bcsfl-ckks", 1)
    results_path = run_dir / RESULTS_FILE
    done = results_path.exists() and json.loads(results_path.read_text()).get("status")
    if done != "completed":
        run_federation(
            run_dir,
            num_supernodes=PLAINTEXT_SPEC.num_clients,
            run_config={**PLAINTEXT_SPEC.run_config(), "ckks": True},
            data_dir=args.data_dir,
            timeout=args.timeout,
            stream=False,
        )
    encrypted = json.loads(results_path.read_text())
    plaintext = json.loads((args.plaintext / PLAINTEXT_SPEC.run_id / RESULTS_FILE).read_text())
    rows = compare(plaintext, encrypted, PLAINTEXT_SPEC.num_rounds)
    report = args.out / "screening.md"
    report.write_text(
        "# CKKS screening against plaintext screening: label flip 30%, seed 42\n\n"
        f"Made by `{shlex.join(['python', '-m', 'sim.ckks_screening', *argv])}`; the "
        f"plaintext run is `{PLAINTEXT_SPEC.run_id}` of the grid.\n\n"
        + comparison_table(rows, encrypted.get("attacker_partitions", []))
        + "\n"
    )
    print(report.read_text())
    return 0 if all(row.same for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
