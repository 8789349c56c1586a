"""The plugin type-checks in mypy's strict mode (configured in pyproject.toml).

Libraries that ship no type information are listed there, so their names are ``Any``;
every ``type: ignore`` left in the plugin names its error code and says why.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = re.compile(r"# type: ignore(\[[a-z-, ]+\])?")


def test_the_plugin_type_checks_in_strict_mode():
    done = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout


def test_every_type_ignore_names_its_code_and_says_why():
    unexplained = []
    for path in sorted((ROOT / "bcsfl_flower").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            found = IGNORE.search(line)
            if found is None:
                continue
            reason_after = line[found.end() :].strip().startswith("#")
            reason_above = number > 1 and lines[number - 2].strip().startswith("#")
            if found.group(1) is None or not (reason_after or reason_above):
                unexplained.append(f"{path.relative_to(ROOT)}:{number}")
    assert not unexplained, f"type: ignore without a code or a reason: {unexplained}"
