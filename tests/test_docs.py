"""The docs site builds with warnings as errors, and the README stays a front page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def test_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page, link, snippet and docstring resolves."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "RoundSettings" in api and "verify_trail" in api


def test_every_docs_page_is_in_the_nav() -> None:
    """A page left out of ``nav`` would build but never be found."""
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    listed = {next(iter(entry.values())) for entry in config["nav"]}
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert pages == listed


def test_readme_is_short_and_leads_with_the_two_commands() -> None:
    """At most 200 lines; the first two code blocks are the main job and the tests."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert blocks[0].startswith("bash scripts/setup.sh && .venv/bin/python -m bcsfl_vision.launch")
    assert blocks[1].strip() == (
        'bash scripts/setup.sh && .venv/bin/python -m pytest -m "not slow" -n auto'
    )
    run = (REPO / ".ci" / "run").read_text()
    assert blocks[1].strip() in run
