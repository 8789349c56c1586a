"""The house's import graph: layered, acyclic, and the core apart from the example app.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``), so ``lint-imports``
run by hand checks the same thing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bcsfl_flower", "bcsfl_vision")
"""The plugin and the example app (``examples/pytorch-vision``)."""


def test_import_contracts_are_kept() -> None:
    """Every import-linter contract (layers, core without the app) holds."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _module_graph() -> nx.DiGraph:
    graph = grimp.build_graph(*PACKAGES)
    edges = nx.DiGraph()
    for module in graph.modules:
        edges.add_node(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in PACKAGES:
                edges.add_edge(module, imported)
    return edges


def test_no_module_imports_itself_back() -> None:
    """No file-level import cycle, deferred imports included."""
    cycles = list(nx.simple_cycles(_module_graph()))
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_cycle() -> None:
    """The graph the cycle check reads holds real edges (a known import is in it)."""
    graph = _module_graph()
    assert graph.has_edge("bcsfl_flower.round.pipeline", "bcsfl_flower.round.notary")
    graph.add_edge("bcsfl_flower.round.notary", "bcsfl_flower.round.pipeline")
    assert list(nx.simple_cycles(graph))
