"""The notebooks run top to bottom (their code cells, in order, in one namespace, as a kernel would)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[cell {number}]", "exec"), namespace)
    output = capsys.readouterr().out
    assert "┌ a g m s ┐" in output and "exact ppl" in output


def test_there_is_a_notebook():
    assert NOTEBOOKS
