"""The explorer page (``bcsfl audit report``): what it shows, what it escapes, in a browser.

The run is the trail fuzzer's three-round run (a commit, a rollback, a commit), with one
client whose round-3 update holds a NaN, so a check rejects it. The browser tests drive
Debian's Chromium headless with Playwright (``tests/browser/explore.mjs``), both
installed by ``scripts/setup.sh``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from recorded_run import record_three_rounds

from bcsfl_flower.audit.explorer.bundle import BUNDLE_PATH, build_bundle
from bcsfl_flower.audit.explorer.page import render_page
from bcsfl_flower.audit.explorer.view import (
    REJECTED,
    BallotView,
    ClientStanding,
    RoundView,
    RunView,
)
from bcsfl_flower.chain.audit import ChainManifest
from bcsfl_flower.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPLORE = ROOT / "tests" / "browser" / "explore.mjs"
CHROMIUM = Path("/usr/bin/chromium")
PAGE_LIMIT = 2_000_000
BROKEN_PARTITION = 4  # node 5: its round-3 update holds a NaN
HOSTILE = (
    "<script>window.__explorer_marker='executed'</script>"
    "<img src=x onerror=\"window.__explorer_marker='img'\">"
)
RED = "rgb(176, 0, 32)"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("explored") / "run"
    run_dir.mkdir()
    return record_three_rounds(run_dir, broken=(BROKEN_PARTITION,))


def report(run_dir: Path, out: Path) -> tuple[int, str]:
    """Run ``bcsfl audit report RUN_DIR --out OUT``; return its exit code and output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["audit", "report", str(run_dir), "--out", str(out)])
    return code, stdout.getvalue() + stderr.getvalue()


def verify_failures(run_dir: Path) -> list[str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(["audit", "verify", "--run-dir", str(run_dir)])
    return [line[5:] for line in stdout.getvalue().splitlines() if line.startswith("FAIL ")]


class _Tags(HTMLParser):
    """Every start tag of a page, with its attributes, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    return tags


def rows(page: str) -> dict[int, str]:
    """Round -> ``data-verified`` of the overview table's rows."""
    found = re.findall(r'data-round="(\d+)" data-verified="(yes|no)"', page)
    return {int(number): verified for number, verified in found}


def test_the_committed_bundle_is_the_pinned_vl_convert_build():
    bundle = BUNDLE_PATH.read_text(encoding="utf-8")
    assert bundle == build_bundle(), "regenerate: python -m bcsfl_flower.audit.explorer.bundle"
    assert "</script" not in bundle.lower()  # it is inlined in a <script> element


def test_the_page_lists_every_round_verified_with_each_clients_standing(recorded, tmp_path):
    out = tmp_path / "pages" / "run.html"
    out.parent.mkdir()
    code, said = report(recorded, out)
    assert code == 0, said
    page = out.read_text(encoding="utf-8")
    assert out.stat().st_size < PAGE_LIMIT
    assert rows(page) == {1: "yes", 2: "yes", 3: "yes"}
    assert "rolled back" in page and "audit trail OK" in page
    results = json.loads((recorded / "results.json").read_text())
    for node, reason in results["rounds"]["3"]["rejected"].items():
        row = f'<tr data-client="{node}" data-standing="{REJECTED}">'
        assert row in page and reason.replace("'", "&#39;") in page
    # every model link resolves from where the page was written
    links = [a["href"] for tag, a in parse(page).tags if tag == "a" and "models/" in a["href"]]
    assert links and all((out.parent / link).is_file() for link in links)
    # the only scripts are the page's own: the plots' data (JSON) and two inline scripts
    scripts = [a for tag, a in parse(page).tags if tag == "script"]
    assert [a.get("type") for a in scripts] == ["application/json", None, None]


def test_a_tampered_round_is_marked_failed_with_the_reason_verify_gives(recorded, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(recorded, run_dir)
    head = ChainManifest.load(run_dir / "chain.json").head_hash
    model = run_dir / "models" / f"{head.hex()}.npz"
    model.write_bytes(model.read_bytes()[:-7] + b"tamper!")
    failures = verify_failures(run_dir)
    assert failures
    code, said = report(run_dir, tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert code == 1 and "does NOT verify" in said
    assert rows(page)[3] == "no" and rows(page)[1] == "yes"
    assert "audit trail INVALID" in page
    text = "".join(parse(page).text)
    assert all(failure in text for failure in failures)


def hostile_run() -> RunView:
    """A run whose every string, as a run directory could hold it, is an attack."""
    round_view = RoundView(
        number=1,
        outcome=HOSTILE,
        failures=(HOSTILE,),
        model_hash=HOSTILE,
        model_file="models/x.npz\" onclick=\"window.__explorer_marker='href'",
        candidate=HOSTILE,
        decision=HOSTILE,
        clients=(ClientStanding(HOSTILE, REJECTED, HOSTILE),),
        validators=(HOSTILE,),
        miners=(HOSTILE,),
        ballots=(BallotView(HOSTILE, (HOSTILE,), (HOSTILE,)),),
        signers=(HOSTILE,),
        block=1,
        transaction=HOSTILE,
        stakes={HOSTILE: 1.0},
    )
    return RunView(
        chain_id=1,
        backend=HOSTILE,
        contract=HOSTILE,
        run=HOSTILE,
        operator=HOSTILE,
        head_round=1,
        head_hash=HOSTILE,
        checks=1,
        failures=(HOSTILE,),
        notes=(HOSTILE,),
        rounds=(round_view,),
        settled_stakes={HOSTILE: 1.0, "</script><script>alert(1)</script>": 2.0},
    )


def test_hostile_strings_are_text_not_markup():
    page = render_page(hostile_run())
    tags = parse(page)
    assert [tag for tag, _ in tags.tags].count("script") == 3
    assert not [tag for tag, _ in tags.tags if tag == "img"]
    assert not [name for _, attrs in tags.tags for name in attrs if name.startswith("on")]
    assert HOSTILE in "".join(tags.text)  # shown, as text


# ------------------------------------------------------------------------------------------
# in a real browser
# ------------------------------------------------------------------------------------------


def browse(page: Path, screenshot: Path | None = None) -> dict:
    """Open ``page`` in headless Chromium; return what ``explore.mjs`` read off it."""
    needed = (CHROMIUM, ROOT / "node_modules" / "playwright-core")
    missing = [str(path) for path in needed if not path.exists()]
    assert not missing, f"run scripts/setup.sh: the browser tests need {missing}"
    command = ["node", str(EXPLORE), str(page), *([str(screenshot)] if screenshot else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_in_a_browser_every_round_is_verified_and_a_rejection_shows_its_reason(recorded, tmp_path):
    report(recorded, tmp_path / "page.html")
    seen = browse(tmp_path / "page.html", tmp_path / "page.png")
    assert seen["plots"] == "ready", seen
    assert [(r["round"], r["verified"], r["status"]) for r in seen["rounds"]] == [
        (n, True, "verified") for n in (1, 2, 3)
    ]
    results = json.loads((recorded / "results.json").read_text())
    (reason,) = results["rounds"]["3"]["rejected"].values()
    assert seen["rejected_reason"] == {"text": reason, "visible": True}
    clients = len(results["rounds"]["3"]["stakes"])
    assert seen["stake_lines"] == clients == len(seen["stake_legend"])
    assert seen["standing_cells"] == 3 * clients
    assert not seen["errors"] and not seen["dialogs"] and not seen["requests"]
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_in_a_browser_a_tampered_round_is_red_and_names_why(recorded, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(recorded, run_dir)
    head = ChainManifest.load(run_dir / "chain.json").head_hash
    (run_dir / "models" / f"{head.hex()}.npz").write_bytes(b"not the anchored model")
    report(run_dir, tmp_path / "page.html")
    seen = browse(tmp_path / "page.html")
    broken = {r["round"]: r for r in seen["rounds"] if not r["verified"]}
    assert list(broken) == [3]
    assert broken[3]["colour"] == RED and broken[3]["status"].startswith("FAILED: ")
    assert any(failure in broken[3]["status"] for failure in verify_failures(run_dir))


def test_in_a_browser_a_hostile_page_executes_nothing(tmp_path):
    page = tmp_path / "hostile.html"
    page.write_text(render_page(hostile_run()), encoding="utf-8")
    seen = browse(page)
    assert seen["plots"] == "ready", seen
    assert seen["marker"] is None and not seen["dialogs"] and not seen["requests"]
    assert seen["rounds"][0]["status"] == f"FAILED: {HOSTILE}"
