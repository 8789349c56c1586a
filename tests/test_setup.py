"""scripts/setup.sh leaves a fresh clone's tracked files untouched.

The one step that used to rewrite a tracked file was the npm install: the committed lock
lacked the other platforms' optional anvil packages, so `npm install` rewrote it and
`npm ci` refused it. Setup now runs `npm ci`, which fails rather than touch the lock.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_npm_ci_installs_the_dev_chain_tools_from_the_committed_lock_unchanged(tmp_path):
    for name in ("package.json", "package-lock.json"):
        shutil.copy(REPO / name, tmp_path / name)
    lock = (REPO / "package-lock.json").read_bytes()
    npm = shutil.which("npm")
    assert npm is not None
    done = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "package-lock.json").read_bytes() == lock
    modules = tmp_path / "node_modules"
    assert (modules / "solc" / "package.json").is_file()
    assert (
        modules / "@openzeppelin" / "contracts" / "utils" / "cryptography" / "ECDSA.sol"
    ).is_file()
    assert list((modules / "@foundry-rs").glob("anvil-*"))  # this platform's anvil binary
