"""Run the grid's federations one after another, resumably, with a live progress display.

Each :class:`~sim.grid.ExperimentSpec` runs as a real ``flwr run`` of the app through
:func:`bcsfl_vision.launch.run_federation`, in ``<out>/runs/<run_id>/``. Before a run
starts, the runner writes the spec to ``spec.json`` beside the results
(:meth:`~sim.grid.ExperimentSpec.to_record`); a run counts as finished when its
``results.json`` says ``completed`` and its ``spec.json`` matches the spec asked for, so
a restarted grid skips finished runs, and a run made with other settings (say, fewer
rounds) is redone instead of being passed off as this one. Runs recorded before a spec
field existed still match as long as the field keeps its default, which the record
leaves out.

Runs go one at a time: each already spreads its clients over every core.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO
from pathlib import Path

from flwr.common.logger import log
from rich.progress import Progress

from bcsfl_vision.launch import FederationFailedError, FederationRun, run_federation
from bcsfl_vision.progress import new_progress
from bcsfl_vision.results import RESULTS_FILE
from sim.grid import ExperimentSpec
from sim.records import TIMING_FILE

SPEC_FILE = "spec.json"
"""The spec a run directory was made for (written before the run starts)."""

RUNS_DIR = "runs"
"""Sub-directory of the output directory that holds one directory per run."""

Launch = Callable[..., FederationRun]
"""Signature of :func:`bcsfl_vision.launch.run_federation` (injectable for tests)."""


@dataclass
class GridOutcome:
    """What one invocation of the runner did.

    Attributes
    ----------
    ran : list[str]
        Run ids executed (and completed) by this invocation.
    reused : list[str]
        Run ids that were already complete and were not recomputed.
    failed : dict[str, str]
        Run id -> error of runs that failed; the grid went on without them.
    """

    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class GridRunner:
    """Run experiment specs as Flower simulations under one output directory.

    Parameters
    ----------
    out_dir : Path
        Output directory; runs go to ``<out_dir>/runs/<run_id>/``.
    data_dir : Path
        Dataset root handed to every run (``data-dir``).
    timeout : float
        Seconds after which one run is stopped and counted as failed.
    launch : Launch, optional
        Function that runs one federation; default
        :func:`~bcsfl_vision.launch.run_federation`.
    stream : bool
        Echo each run's log while it runs.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        data_dir: Path,
        timeout: float = 7200.0,
        launch: Launch = run_federation,
        stream: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.data_dir = Path(data_dir)
        self.timeout = timeout
        self.launch = launch
        self.stream = stream

    def run_dir(self, spec: ExperimentSpec) -> Path:
        """Return the directory of ``spec``'s run."""
        return self.out_dir / RUNS_DIR / spec.run_id

    def is_complete(self, spec: ExperimentSpec) -> bool:
        """Return whether ``spec`` has a completed run made with exactly this spec."""
        run_dir = self.run_dir(spec)
        try:
            recorded = json.loads((run_dir / SPEC_FILE).read_text())
            status = json.loads((run_dir / RESULTS_FILE).read_text()).get("status")
        except (OSError, ValueError):
            return False
        return status == "completed" and recorded == spec.to_record()

    def run(self, specs: Sequence[ExperimentSpec]) -> GridOutcome:
        """Run every spec that is not complete yet, in order, logging progress.

        A failed run is logged and recorded in the outcome; the grid goes on.
        """
        specs = list(dict.fromkeys(specs))  # drop duplicates, keep order
        outcome = GridOutcome()
        pending = []
        for spec in specs:
            if self.is_complete(spec):
                outcome.reused.append(spec.run_id)
            else:
                pending.append(spec)
        log(
            INFO,
            "grid: %d runs, %d already complete, %d to run, in %s",
            len(specs),
            len(outcome.reused),
            len(pending),
            self.out_dir,
        )
        started = time.monotonic()
        durations: list[float] = []
        with new_progress() as display:
            grid_task = display.add_task(
                "", total=len(specs), completed=len(outcome.reused), label="grid"
            )
            for index, spec in enumerate(pending):
                left = len(pending) - index
                eta = f", ETA {_clock(left * sum(durations) / len(durations))}" if durations else ""
                log(
                    INFO,
                    "grid [%d/%d] running %s | done %d, failed %d, left %d | elapsed %s%s",
                    len(outcome.reused) + index + 1,
                    len(specs),
                    spec.run_id,
                    len(outcome.ran) + len(outcome.reused),
                    len(outcome.failed),
                    left,
                    _clock(time.monotonic() - started),
                    eta,
                )
                begun = time.monotonic()
                self._run_logged(spec, outcome, display)
                durations.append(time.monotonic() - begun)
                display.update(
                    grid_task,
                    advance=1,
                    description=f"ran {len(outcome.ran)}, failed {len(outcome.failed)}",
                )
        log(
            INFO,
            "grid: finished in %s: %d ran, %d reused, %d failed",
            _clock(time.monotonic() - started),
            len(outcome.ran),
            len(outcome.reused),
            len(outcome.failed),
        )
        return outcome

    def _run_logged(self, spec: ExperimentSpec, outcome: GridOutcome, display: Progress) -> None:
        """Run ``spec``, record it in ``outcome`` as ran or failed, and log which."""
        begun = time.monotonic()
        try:
            accuracy = self._run_one(spec, display)
        except FederationFailedError as err:
            outcome.failed[spec.run_id] = str(err)
            log(ERROR, "grid: %s FAILED: %s", spec.run_id, err)
            return
        outcome.ran.append(spec.run_id)
        log(
            INFO,
            "grid: %s completed in %s, final test accuracy %s",
            spec.run_id,
            _clock(time.monotonic() - begun),
            f"{accuracy:.4f}" if accuracy is not None else "n/a",
        )

    def _run_one(self, spec: ExperimentSpec, display: Progress) -> float | None:
        run_dir = self.run_dir(spec)
        if run_dir.exists():  # an unfinished or outdated run: start it afresh
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / SPEC_FILE).write_text(json.dumps(spec.to_record(), indent=2) + "\n")
        started = time.monotonic()
        run = self.launch(
            run_dir,
            num_supernodes=spec.num_clients,
            run_config=spec.run_config(),
            data_dir=self.data_dir,
            timeout=self.timeout,
            stream=self.stream,
            progress=display,
        )
        wall_s = round(time.monotonic() - started, 1)
        (run_dir / TIMING_FILE).write_text(json.dumps({"wall_s": wall_s}) + "\n")
        return (run.results or {}).get("final_test_accuracy")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
