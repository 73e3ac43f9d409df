"""MkDocs hooks (mkdocs.yml: ``hooks:``): a stale generated page fails the build; the notebooks join the site.

* ``on_pre_build``: docs/reference/cli.md must equal what scripts/flags_table.py generates from the parser now.
  A flag added, renamed or re-documented without ``python scripts/flags_table.py --write`` stops the build with
  one line saying so (strict or not), so the published reference cannot drift from the program.
* ``on_page_markdown``: the package layout on the Development page is drawn from the source at build time (each
  module's path and the first line of its docstring), so it lists every module there is, never a stale few.
* ``on_files``: the notebooks stay in notebooks/ (where tests/test_notebooks.py executes them and Jupyter users
  find them) and are added to the site as notebooks/NAME.ipynb; mkdocs-jupyter renders them without running
  them (``execute: false`` in mkdocs.yml), as stored: the repository keeps them without outputs.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
PACKAGE = REPO / "src" / "neurallm"
LAYOUT_MARKER = "<!-- package layout -->"


def _flags_table():
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_pre_build(config, **kwargs) -> None:
    flags_table = _flags_table()
    page = flags_table.CLI_PAGE
    if not page.is_file() or page.read_text(encoding="utf-8") != flags_table.cli_reference():
        raise PluginError(f"{page.relative_to(REPO)} is stale (it differs from the CLI parser): "
                          "run python scripts/flags_table.py --write")


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config, **kwargs):
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{notebook.name}", src_dir=str(REPO), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def package_layout() -> str:
    """A table of every module under src/neurallm: its path and the first line of its docstring."""
    rows = ["| module | what it is |", "| --- | --- |"]
    for path in sorted(PACKAGE.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        first = " ".join(docstring.split("\n\n")[0].split()).replace("|", "\\|")
        first = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first)  # Sphinx roles (:mod:`x`) read as plain code here
        rows.append(f"| `{path.relative_to(PACKAGE.parent).as_posix()}` | {first} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if LAYOUT_MARKER in markdown:
        return markdown.replace(LAYOUT_MARKER, package_layout())
    return markdown
