"""Execute notebooks/walkthrough.ipynb top to bottom, so the walkthrough cannot rot.

The notebook runs two real federations (FedAvg and BCSFL, 6 clients, 3 rounds, 30%
label flippers) and asserts on its own results: the chain records match the run, a
stored model verifies and reproduces its accuracy, a tampered one does not.
"""

import sys

import nbformat
import pytest
from conftest import DATA_DIR, REPO
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

# The slow tier (`pytest -m slow`): .ci/run runs it after the README's fast tier.
pytestmark = pytest.mark.slow

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # A kernelspec for this interpreter, first on JUPYTER_PATH: "python3" is then this
    # virtualenv's Python even where a user-wide python3 kernel points elsewhere.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("BCSFL_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("BCSFL_NOTEBOOK_OUT", str(tmp_path / "out"))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=900,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure

    outputs = [
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    ]
    text = "".join(outputs)
    assert f"python {sys.executable}" in text
    assert "FedAvg: completed" in text and "BCSFL: completed" in text
    assert "audit trail OK" in text
    assert (tmp_path / "out" / "bcsfl" / "chain.json").is_file()
    assert any(
        output.get("output_type") == "display_data" and "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
