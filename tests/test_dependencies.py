"""The core's dependencies are exactly what the core imports.

A dependency the core does not import costs every user an install for nothing (``rich``
and ``psutil`` were core dependencies for the example app's sake); a package the core
imports without declaring it works only while another package happens to bring it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNTIME_ONLY = {
    "coincurve": "eth-keys signs and recovers with it when it is installed; never imported",
}
"""Core dependencies the core uses without importing them by name, and why."""


def _name(requirement: str) -> str:
    """Return a requirement's distribution name, normalised (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def imported_distributions(package: Path) -> dict[str, set[str]]:
    """Return distribution -> modules of ``package`` that import it (at any depth)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == package.name:
                    continue
                for distribution in owners.get(top, [top]):
                    found.setdefault(_name(distribution), set()).add(path.name)
    return found


def test_core_dependencies_are_exactly_what_the_core_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_name(r) for r in requirements}
        for extra, requirements in project["optional-dependencies"].items()
    }
    imported = imported_distributions(ROOT / "bcsfl_flower")
    undeclared = {
        distribution: sorted(modules)
        for distribution, modules in imported.items()
        if distribution not in core and not any(distribution in e for e in extras.values())
    }
    assert not undeclared, f"imported by the core, declared nowhere: {undeclared}"
    unused = core - set(imported) - set(RUNTIME_ONLY)
    assert not unused, f"core dependencies the core never imports: {sorted(unused)}"
    assert set(RUNTIME_ONLY) <= core, "a runtime-only exception that is no dependency"
