"""Cheap start-up: commands that build no model do not import torch (issue 7, item 6).

Each check runs in a fresh interpreter, since this test process has imported torch long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_patterned_corpus

pytestmark = pytest.mark.integration  # each test probes a fresh interpreter's imports in a subprocess

REPO = Path(__file__).resolve().parents[1]

# runs the CLI in-process and reports which heavy modules it imported
PROBE = """
import json, sys
from neurallm.cli import main

try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules, "tqdm": "tqdm" in sys.modules}))
"""


def _probe(argv: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, cwd=cwd)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["prepare", "--help"],
    ["generate", "--help"],
    ["serve", "--help"],
    ["datasets"],
    ["explain", "--range", "1..20"],
    ["explain", "--eval", "--range", "1..40"],
    ["prepare", "--data", "{corpus}", "--out", "{tmp}/prepared"],
], ids=lambda argv: " ".join(argv))
def test_commands_that_build_no_model_do_not_import_torch(argv, tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=30)
    result = _probe([a.format(corpus=corpus, tmp=tmp_path) for a in argv], tmp_path)
    assert result["code"] == 0
    assert result["torch"] is False


def test_help_imports_neither_numpy_nor_the_download_stack(tmp_path):
    """--help stays well under 0.5 s: only the settings dataclasses are imported to build the flags."""
    result = _probe(["--help"], tmp_path)
    assert result["numpy"] is False and result["tqdm"] is False


def test_the_probe_sees_torch_when_a_command_needs_it(tmp_path):
    """The check above can fail: a command that does load torch is seen doing so."""
    result = _probe(["eval", str(tmp_path / "no-such-run")], tmp_path)
    assert result["torch"] is True


def test_import_neurallm_is_lazy():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    code = ("import sys, neurallm; lazy = 'torch' not in sys.modules; neurallm.prepare; still = 'torch' not in sys.modules; "
            "neurallm.evaluate; print(lazy, still, 'torch' in sys.modules, sorted(set(neurallm.__all__) - set(dir(neurallm))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "True", "True", "[]"]
