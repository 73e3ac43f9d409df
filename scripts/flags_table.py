#!/usr/bin/env python3
"""The README's flag tables, generated from the CLI parser (itself generated from the settings dataclasses).

    python scripts/flags_table.py            # print every subcommand's table
    python scripts/flags_table.py --write    # rewrite the tables in README.md between their markers
    python scripts/flags_table.py --check    # exit 1 if README.md differs (tests/test_cli.py does the same)

README.md holds one table per subcommand between ``<!-- flags: COMMAND -->`` and ``<!-- /flags -->``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = re.compile(r"(<!-- flags: (\w+) -->\n)(.*?)(<!-- /flags -->)", re.DOTALL)
_DEFAULT = re.compile(r"^(.*) \(default: (.*)\)$", re.DOTALL)
_HIDDEN = {"-h", "--debug"}  # the same in every subcommand; the README says so once


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _row(action: argparse.Action) -> str:
    names = action.option_strings or [action.dest.upper()]
    text = " ".join((action.help or "").split())
    match = _DEFAULT.match(text)
    meaning, default = (match[1], match[2]) if match else (text, "off" if action.nargs == 0 else "")
    if action.required or not action.option_strings:
        meaning, default = meaning.removesuffix(" (required)"), "required"
    if action.choices and action.option_strings and not all(str(c) in meaning for c in action.choices):
        meaning += ": " + " ".join(f"`{c}`" for c in action.choices)
    flags = " ".join(f"`{n}`" for n in names)
    shown = f"`{default}`" if default and len(default) < 20 else default  # a long default is words, not a value
    meaning = re.sub(r"(<\w+>)", r"`\1`", meaning)  # <eos> would be read as an HTML tag and vanish
    cells = (flags, shown, meaning)
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def flags_table(command: str, parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown table of ``neurallm COMMAND``'s flags, in ``--help`` order."""
    if parser is None:
        from neurallm.cli import build_parser

        parser = build_parser()
    sub = _subparsers(parser)[command]
    rows = [_row(a) for a in sub._actions if not _HIDDEN & set(a.option_strings)]
    return "\n".join(["| flag | default | meaning |", "| --- | --- | --- |", *rows]) + "\n"


def regenerate(readme: str) -> str:
    """``readme`` with every marked table replaced by the parser's."""
    from neurallm.cli import build_parser

    parser = build_parser()
    return MARKERS.sub(lambda m: m[1] + flags_table(m[2], parser) + m[4], readme)


def main(argv: list[str]) -> int:
    if not argv:
        from neurallm.cli import SUBCOMMANDS

        for command in SUBCOMMANDS:
            print(f"### neurallm {command}\n{flags_table(command)}")
        return 0
    text = README.read_text(encoding="utf-8")
    updated = regenerate(text)
    if argv == ["--write"]:
        README.write_text(updated, encoding="utf-8")
        return 0
    if argv == ["--check"]:
        if updated != text:
            print("README.md flag tables differ from the parser: run python scripts/flags_table.py --write", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
