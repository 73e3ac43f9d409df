"""The package's layers: data flows one way, and every import points down (to an earlier stage) or across.

::

    _version, errors
      └ settings, fileio, locking, runtime, distributed, presets,      plain helpers
        elastic
          └ config, sampling                                            model/train/eval/serve/sampling settings
              └ data                                                    text → tokens → vocab → ids → batches
                  └ run_config, runfolder, outputs                      a run's config.json, its folder, output paths
                      └ models, weights
                          └ evaluation, evaluation_methods, scoring, explain, plots
                              └ training
                                  └ generation
                                      └ api, export, integrations
                                          └ server
                                              └ cli, __main__, the package's __init__ (lazy names of every layer)

Read from the source, so imports inside functions count too (only ``if TYPE_CHECKING:`` blocks are skipped: they
never run). A module the table does not name fails the test until it is given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "neurallm"

# lowest first; a module may import its own layer and those before it
LAYERS: list[set[str]] = [
    {"neurallm._version", "neurallm.errors"},
    {"neurallm.settings", "neurallm.fileio", "neurallm.locking", "neurallm.runtime", "neurallm.distributed",
     "neurallm.presets", "neurallm.elastic"},
    {"neurallm.config", "neurallm.sampling"},
    {"neurallm.data"},
    {"neurallm.run_config", "neurallm.runfolder", "neurallm.outputs"},
    {"neurallm.models", "neurallm.weights"},
    {"neurallm.evaluation", "neurallm.evaluation_methods", "neurallm.scoring", "neurallm.explain", "neurallm.plots"},
    {"neurallm.training"},
    {"neurallm.generation"},
    {"neurallm.api", "neurallm.export", "neurallm.integrations", "neurallm.hf_export"},
    {"neurallm.server"},
    {"neurallm.cli", "neurallm.__main__", "neurallm"},
]


def layer_of(module: str) -> int:
    """The layer of ``module`` (a subpackage's modules share its layer)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        for number, layer in enumerate(LAYERS):
            if name in layer:
                return number
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every neurallm import that can run in ``path``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names if alias.name.split(".")[0] == "neurallm")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "neurallm":
                if child.module == "neurallm":  # `from neurallm import x`: the package's __init__ unless x is a module
                    for alias in child.names:
                        sub = f"neurallm.{alias.name}"
                        found.append((child.lineno, sub if (PACKAGE / alias.name).exists() or
                                      (PACKAGE / f"{alias.name}.py").exists() else "neurallm"))
                else:
                    found.append((child.lineno, child.module))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_of_the_package_has_a_layer():
    missing = [module_name(p) for p in SOURCES if _safe_layer(module_name(p)) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def _safe_layer(module: str) -> int | None:
    try:
        return layer_of(module)
    except KeyError:
        return None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_import_runs_back_up_the_layers(path):
    here = module_name(path)
    upward = [f"line {line}: {module} (layer {layer_of(module)})" for line, module in imported_modules(path)
              if _safe_layer(module) is not None and _safe_layer(here) is not None and layer_of(module) > layer_of(here)]
    assert not upward, f"{here} (layer {layer_of(here)}) imports up: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The check can fail: an import of the package's __init__ from the training layer is found and placed on top."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from neurallm import __version__\n    from neurallm.config import TrainConfig\n")
    found = imported_modules(probe)
    assert found == [(2, "neurallm"), (3, "neurallm.config")]
    assert layer_of("neurallm") > layer_of("neurallm.training.loop") > layer_of("neurallm.config")
