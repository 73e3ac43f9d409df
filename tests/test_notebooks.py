"""The notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel), without warnings or errors.

The repository keeps them with outputs stripped (``test_notebooks_are_stored_without_outputs``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # each test runs a notebook in a Jupyter kernel

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SRC = Path(__file__).resolve().parents[1] / "src"


def _outputs(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") if output.get("output_type") == "stream" else str(output.get("data", "")))
            if output.get("output_type") == "error":
                texts.append(f"{output['ename']}: {output['evalue']}")
    return "\n".join(texts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel_without_warnings(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # the kernel is a separate process: it must import this checkout and write its runs and cache under tmp_path
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("NEURALLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("NEURALLM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    output = _outputs(notebook)
    assert "Warning" not in output and "Traceback" not in output, output
    if path.name == "batching.ipynb":
        assert "┌ a g m s ┐" in output and "exact ppl" in output


def test_notebooks_are_stored_without_outputs():
    import json

    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        assert all(not cell.get("outputs") and cell.get("execution_count") is None
                   for cell in cells if cell["cell_type"] == "code"), f"{path.name}: strip its outputs"


def test_there_is_a_notebook():
    assert NOTEBOOKS


def test_the_news_notebook_runs_from_its_own_folder_and_shows_its_picture_and_progress(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = Path(__file__).resolve().parents[1] / "notebooks" / "news_csv.ipynb"
    if not (path.parents[2] / "shared" / "data" / "ag_news" / "test.csv").is_file():
        pytest.skip("ag_news not found beside the repository")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("NEURALLM_NOTEBOOK_TINY", "1")
    monkeypatch.delenv("NEURALLM_DATA", raising=False)  # found from the notebook's folder, as Jupyter runs it
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the picture, not "<Figure size ...>"
    assert "<Figure size" not in _outputs(notebook)
    assert "end of training" in _outputs(notebook)  # progress lines are shown
    assert "shuffle_windows=True" in "".join(cell.source for cell in notebook.cells)
