"""Benchmark the explorer page: how long ``bcsfl audit report`` takes and how large the page is.

Measures, on one run directory (the main job's, by default: 10 clients, 3 rounds), in
one run and interleaved with its baseline:

- the page written in process (:func:`~bcsfl_flower.audit.explorer.write_report`: open
  the chain, verify, render, write), as the launcher writes it at the end of a run,
  against ``verify_trail`` alone on the same freshly opened chain;
- the command-line wall time of ``bcsfl audit report`` against ``bcsfl audit verify``,
  both in a new interpreter (their imports included);
- the page's size.

The figures go to ``sim/results/bench/report.json`` with the command and the code
version. Usage::

    python -m bcsfl_vision.launch --num-supernodes 10 --run-config "num-server-rounds=3" \
        --output-dir runs/main-job
    python sim/bench_report.py --run-dir runs/main-job

The last line is ``explorer page: X.XX s, Y.YY MB (CLI X.XX s wall, R.RRx audit verify)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bcsfl_flower.audit.explorer import write_report
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import ChainManifest
from sim.robust_bench import code_version

RESULTS = Path(__file__).resolve().parent / "results" / "bench" / "report.json"


def _verify_only(manifest_path: Path) -> None:
    manifest = ChainManifest.load(manifest_path)
    connection, trail = manifest.open("embedded")
    try:
        verify_trail(trail, manifest)
    finally:
        connection.close()


def _seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _cli(*arguments: str) -> Callable[[], object]:
    command = [sys.executable, "-m", "bcsfl_flower.cli", "audit", *arguments]
    return lambda: subprocess.run(command, capture_output=True, check=False)


def measure(run_dir: Path, repeats: int) -> dict[str, float]:
    """Return the medians of ``repeats`` interleaved pairs, and the page's size."""
    manifest = run_dir / "chain.json"
    with tempfile.TemporaryDirectory() as scratch:
        page = Path(scratch) / "report.html"
        report, verify, cli_report, cli_verify = [], [], [], []
        for _ in range(repeats):
            verify.append(_seconds(lambda: _verify_only(manifest)))
            report.append(_seconds(lambda: write_report(manifest, page)))
            cli_verify.append(_seconds(_cli("verify", "--run-dir", str(run_dir))))
            cli_report.append(_seconds(_cli("report", str(run_dir), "--out", str(page))))
        size = page.stat().st_size
    return {
        "report_s": statistics.median(report),
        "verify_s": statistics.median(verify),
        "cli_report_s": statistics.median(cli_report),
        "cli_verify_s": statistics.median(cli_verify),
        "page_mb": size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished BCSFL run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    figures = measure(args.run_dir, args.repeats)
    rounds = ChainManifest.load(args.run_dir / "chain.json").latest_round
    record = {
        "command": "python " + " ".join(sys.argv),
        "code_version": code_version(),
        "measured_at": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
        "repeats": args.repeats,
        **{key: round(value, 3) for key, value in figures.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    ratio = figures["cli_report_s"] / figures["cli_verify_s"]
    print(
        f"explorer page: {figures['report_s']:.2f} s, {figures['page_mb']:.2f} MB "
        f"(CLI {figures['cli_report_s']:.2f} s wall, {ratio:.2f}x audit verify)"
    )


if __name__ == "__main__":
    main()
