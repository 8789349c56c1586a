"""The trail fuzzer: every single-step tamper of a run directory is caught or declared.

One small run (three rounds through the Strategy API: a commit, a rollback, a commit; real
chain, contract, model store, miners' mod and ``results.json``) is mutated one way at a
time (:mod:`run_mutations`). For each mutation, one of two outcomes is required:

* ``bcsfl audit verify`` fails, naming the round the mutation concerns (or, for a file
  the rounds share, the file);
* or the mutation is one the audit declares: a ``results.json`` field that ``bcsfl audit
  show`` lists as unverified, or a file ``verify`` names as not part of the trail.

Every audit command (``verify``, ``list``, ``show``, ``replay``, ``head``; and
``report`` on the slow tier's strata, where the explorer page must judge the run as
``verify`` does) must answer without a traceback, and none may read a file outside the
run directory (an audit hook watches every ``open``). The fast tier tries a fixed
sample, drawn by Hypothesis with a fixed seed; the slow tier tries every mutation and
writes the report committed in ``docs/fuzzer-report.json``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recorded_run import record_three_rounds
from run_mutations import Mutation, mutations

from bcsfl_flower.audit.run_results import RESULTS_FILE, RunResults
from bcsfl_flower.audit.verification import verify_trail
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.cli import main

REPORT = Path(__file__).resolve().parents[1] / "docs" / "fuzzer-report.json"
COMMANDS = (("verify",), ("list",), ("show", "2"), ("replay",), ("head",))
PAGE = ("report", "--out", os.devnull)
"""The explorer page, run on the slow tier's strata (each run verifies the trail again)."""

_opened: list[str] | None = None


def _watch_opens(event: str, arguments: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(arguments[0], str | Path):
        _opened.append(os.path.realpath(arguments[0]))


sys.addaudithook(_watch_opens)


@dataclass(frozen=True)
class Verdict:
    """How the audit answered one mutation."""

    outcome: str  # "caught", "unverified" or "not part of the trail"
    detail: str


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path, list[Mutation]]:
    """The run, a pristine copy outside it (where links point) and every mutation."""
    run_dir = record_three_rounds(tmp_path_factory.mktemp("fuzzed-run"))
    outside = tmp_path_factory.mktemp("outside") / "copy"
    shutil.copytree(run_dir, outside)
    code, out = _audit(run_dir, "verify")
    assert code == 0 and "2 anchored and 1 rolled-back" in out, out
    return run_dir, outside, mutations(run_dir)


def _audit(run_dir: Path, *command: str) -> tuple[int, str]:
    """Run ``bcsfl audit`` in this process; return its exit code and all it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["audit", "--run-dir", str(run_dir), *command])
    return code, out.getvalue() + err.getvalue()


class SharedChain:
    """The pristine run's chain, opened once: a mutation that leaves the chain's files
    alone is verified against it directly (the CLI replays the journal on every call)."""

    def __init__(self, run_dir: Path) -> None:
        self.connection, trail = ChainManifest.load(run_dir / "chain.json").open()
        self.trail = _ReadOnce(trail)

    def verify(self, run_dir: Path) -> tuple[int, str]:
        """``verify``'s exit code and report, as the CLI prints them."""
        try:
            manifest = ChainManifest.load(run_dir / "chain.json")
        except (FileNotFoundError, ValueError) as err:  # as the CLI answers it
            return 2, f"error: {err}"
        report = verify_trail(self.trail, manifest)
        lines = [f"FAIL {failure.message}" for failure in report.failures]
        lines += [f"NOTE {note}" for note in report.notes]
        if report.unaccounted:
            lines.append(f"NOTE not part of the trail, not audited: {report.unaccounted}")
        return (0 if report.ok else 1), "\n".join(lines)


class _ReadOnce:
    """The trail, its round records read from the chain once (the chain never changes)."""

    _READS = ("anchored_rounds", "rollbacks", "latest_round", "operator_certifies")

    def __init__(self, trail) -> None:
        self._trail = trail
        self._cache: dict = {}

    def __getattr__(self, name: str):
        value = getattr(self._trail, name)
        if name not in self._READS and name != "get_round":
            return value

        def read(*args):
            if (name, args) not in self._cache:
                self._cache[(name, args)] = value(*args)
            return self._cache[(name, args)]

        return read


def _touches_chain(mutation: Mutation) -> bool:
    return mutation.file in ("chain.json", "chain") or mutation.file.startswith("chain/")


def judge(
    mutation: Mutation,
    pristine_run: Path,
    outside: Path,
    scratch: Path,
    shared: SharedChain | None = None,
    *,
    page: bool = False,
) -> Verdict:
    """Apply ``mutation`` to a fresh copy and hold the audit to the contract.

    Every command of :data:`COMMANDS` runs through the CLI (and :data:`PAGE` with
    ``page``); with ``shared``, only ``verify`` runs, against the shared chain where the
    mutation leaves it alone.
    """
    global _opened
    run_dir = scratch / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(pristine_run, run_dir, symlinks=True)
    mutation.apply(run_dir, outside)
    answers = {}
    _opened = []
    try:
        if shared is not None and not _touches_chain(mutation):
            answers["verify"] = shared.verify(run_dir)  # raises on a crash
        else:
            commands = (*COMMANDS, PAGE) if page else COMMANDS
            for command in commands if shared is None else (("verify",),):
                answers[command[0]] = _audit(run_dir, *command)  # raises on a crash
    finally:
        read_outside = [p for p in _opened if p.startswith(str(outside.resolve()))]
        _opened = None
    assert not read_outside, f"{mutation}: the audit read {read_outside[:2]} outside the run"
    for name, (_, out) in answers.items():
        assert "Traceback" not in out, f"{mutation}: {name} printed a traceback:\n{out}"
    code, out = answers["verify"]
    if "report" in answers:  # the explorer page judges the run as verify does
        assert (answers["report"][0] == 0) == (code == 0), f"{mutation}: {answers['report']}"
    if code != 0:
        _require_named(mutation, out)
        return Verdict("caught", _first_failure(out))
    if mutation.file == RESULTS_FILE and _listed_unverified(pristine_run, mutation.where):
        return Verdict("unverified", mutation.where)
    notes = [line for line in out.splitlines() if line.startswith("NOTE")]
    assert any(mutation.file in note for note in notes), (
        f"{mutation}: verify passes and nothing declares it:\n{out}"
    )
    return Verdict("noted by verify", notes[0])


def _require_named(mutation: Mutation, out: str) -> None:
    """A failure names the round the mutation concerns, or the file it touched."""
    if mutation.round is not None:
        assert f"round {mutation.round}" in out, (
            f"{mutation}: verify fails without naming it:\n{out}"
        )


def _first_failure(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(("FAIL", "error"))]
    return lines[0][:160] if lines else out.strip().splitlines()[-1][:160]


def _listed_unverified(run_dir: Path, path: str) -> bool:
    """Whether ``show`` lists the results.json field at ``path`` (or one above) unverified."""
    return any(path == top or path.startswith(top + "/") for top in _unverified_tops(run_dir))


@functools.lru_cache(maxsize=4)
def _unverified_tops(run_dir: Path) -> frozenset[str]:
    """The pristine run's results.json paths ``show`` lists as unverified (read once)."""
    results = RunResults.read(run_dir / RESULTS_FILE)
    listed = set(results.run_unverified())
    for number in results.rounds:
        listed |= {f"rounds/{number}/{key}" for key in results.unverified(int(number))}
    return frozenset(listed)


def test_the_fuzzer_covers_every_kind_of_file_and_tamper(pristine):
    _, _, found = pristine
    files = {m.file.split("/")[0] for m in found}
    assert {"chain.json", RESULTS_FILE, "models", "chain", "notes.txt"} <= files
    actions = Counter(m.action.split(" ")[0] for m in found)
    assert {"edited", "deleted", "shortened", "linked", "renamed", "added", "duplicated"} <= set(
        actions
    )
    assert sum(m.file.endswith(".json") and m.file.startswith("models/") for m in found) > 300


SAMPLE = 24


@settings(
    max_examples=SAMPLE,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(index=st.integers(min_value=0, max_value=10**9))
def test_a_sample_of_tampers_is_caught_or_declared(pristine, tmp_path, index):
    run_dir, outside, found = pristine
    judge(found[index % len(found)], run_dir, outside, tmp_path)


def strata(found: list[Mutation]) -> list[Mutation]:
    """One mutation of each kind of file and action: every command runs on these."""
    firsts: dict[tuple[str, str], Mutation] = {}
    for mutation in found:
        kind = mutation.file.rsplit(".", 1)[-1] if "/" in mutation.file else mutation.file
        firsts.setdefault((kind, mutation.action.split(" ")[0]), mutation)
    return list(firsts.values())


@pytest.mark.slow
def test_every_tamper_is_caught_or_declared_and_the_report_is_current(pristine, tmp_path):
    run_dir, outside, found = pristine
    for mutation in strata(found):
        judge(mutation, run_dir, outside, tmp_path, page=True)
    shared = SharedChain(run_dir)
    tally: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    seen: set[tuple[str, str, str]] = set()
    try:
        for mutation in found:
            verdict = judge(mutation, run_dir, outside, tmp_path, shared)
            tally[verdict.outcome] += 1
            kind = (verdict.outcome, mutation.file.rsplit(".", 1)[-1], mutation.action.split()[0])
            if kind not in seen:  # one example of each outcome, kind of file and action
                seen.add(kind)
                examples.setdefault(verdict.outcome, []).append(f"{mutation} -> {verdict.detail}")
    finally:
        shared.connection.close()
    report = {
        "command": "pytest -m slow tests/test_trail_fuzzer.py",
        "mutations": len(found),
        "all_commands_on": len(strata(found)),
        "outcomes": dict(sorted(tally.items())),
        "passed_unexplained": 0,
        "examples": dict(sorted(examples.items())),
    }
    if os.environ.get("BCSFL_WRITE_FUZZER_REPORT"):
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
    committed = json.loads(REPORT.read_text())
    assert (committed["mutations"], committed["outcomes"]) == (len(found), report["outcomes"])
