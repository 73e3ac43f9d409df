"""How a setting is declared, once: a dataclass field whose metadata says how users spell and change it.

Every user-facing setting (of ``SourceSettings``, ``TokenizerSettings``, ``VocabSettings``, ``ModelConfig``,
``TrainConfig``, ``ServeConfig`` and those of ``eval``, ``score`` and ``explain`` in :mod:`neurallm.config`) is a
field made with :func:`setting`. From those fields, and nothing else, come:

* the CLI flags of ``prepare`` / ``train`` / ``eval`` / ``score`` / ``explain`` / ``serve`` (name, type, choices,
  help showing the default);
* the keyword arguments ``neurallm.prepare()``, ``neurallm.train()``, ``neurallm.load_run()``, ``Run.evaluate()``
  and ``Run.score()`` accept (:func:`split_settings`);
* what ``--resume`` compares against the saved run, and what it may change (:func:`neurallm.run_config.RunConfig.resumed_with`).

This module is plain Python (no torch): ``neurallm --help`` builds its parser from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from neurallm.errors import ConfigError


def setting(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    resumable: bool = False,
    derived: bool = False,
) -> Any:
    """A dataclass field that is a user setting.

    Args:
        default: the default value (omit for a required setting such as ``SourceSettings.data``).
        help: one line for ``--help`` and the README flag table; the default is appended automatically.
        flag: the CLI spelling when it is not ``--`` + the name with ``-`` for ``_`` (``eval_context`` → ``--context``).
        aliases: other accepted spellings, e.g. the PyTorch example's ``--batch_size``.
        choices: the allowed values (argparse checks them; ``__post_init__`` should too, for API callers).
        parse: turns the flag's text into the value when the field's type cannot (``0.9,0.05,0.05`` → a tuple).
        metavar: the placeholder shown in ``--help``.
        default_text: how ``--help`` shows the default when the value alone says too little (``None`` → "auto ...").
        resumable: ``--resume`` may change this setting (e.g. ``epochs``); all others must match the saved run.
        derived: set by neurallm itself (``vocab_size``), so neither a flag nor a keyword argument.
    """
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "parse": parse,
                "metavar": metavar, "default_text": default_text, "resumable": resumable, "derived": derived}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One user setting, read from its dataclass field.

    Attributes:
        name: the field name (the Python keyword and the ``config.json`` key).
        owner: the dataclass it belongs to.
        kind: the value type without ``None`` (``int`` for ``int | None``).
        optional: whether ``None`` is allowed.
        default: the default value (``dataclasses.MISSING`` if required).
        help: the help text, without the default.
        flag: the CLI flag, e.g. ``--batch-size``.
        aliases: other accepted spellings of the flag.
        choices: allowed values, or None.
        parse: text → value for the CLI, or None to use ``kind``.
        metavar: placeholder for ``--help``, or None.
        resumable: ``--resume`` may change it.
    """

    name: str
    owner: type
    kind: type
    optional: bool
    default: Any
    help: str
    flag: str
    aliases: tuple[str, ...]
    choices: tuple | None
    parse: Callable[[str], Any] | None
    metavar: str | None
    resumable: bool
    default_text: str | None

    def help_with_default(self) -> str:
        """The help text followed by ``(default: …)``, as every flag's help shows it."""
        if self.default_text is not None:
            shown = self.default_text
        elif self.default is MISSING or (self.kind is bool and self.default is False):
            return self.help
        else:
            shown = format_value(self.default)
        return f"{self.help} (default: {shown})"


def format_value(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) >= 1 else str(value)
    return str(value)


def _value_type(annotation: Any) -> tuple[type, bool]:
    """``int | None`` → (int, True); ``str`` → (str, False); ``tuple[float, ...]`` → (tuple, False)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a setting may be one type or None, got {annotation}")
        kind, _ = _value_type(rest[0])
        return kind, True
    origin = typing.get_origin(annotation)
    return (origin or annotation), False


def settings_of(*classes: type) -> list[Setting]:
    """The settings users may give (flags, keyword arguments) of ``classes``, in field order."""
    found = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if "help" not in meta:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with neurallm.settings.setting(help=...)")
            if meta["derived"]:
                continue
            kind, optional = _value_type(hints[f.name])
            found.append(Setting(
                name=f.name, owner=cls, kind=kind, optional=optional, default=f.default, help=meta["help"],
                flag=meta["flag"] or "--" + f.name.replace("_", "-"), aliases=meta["aliases"],
                choices=meta["choices"], parse=meta["parse"], metavar=meta["metavar"],
                resumable=meta["resumable"], default_text=meta["default_text"],
            ))
    return found


def split_settings(given: dict, *classes: type, what: str) -> list[dict]:
    """Sort keyword settings into one dict per class, refusing names that none of them has.

    Args:
        given: keyword arguments, e.g. ``{"emsize": 64, "level": "char"}``.
        classes: the settings dataclasses that may take them.
        what: the operation, for the error message (``prepare``, ``train``).

    Raises:
        ConfigError: a name that is not a setting of ``classes`` (listing the known ones).
    """
    per_class: list[dict] = [{} for _ in classes]
    owners = {s.name: i for i, cls in enumerate(classes) for s in settings_of(cls)}
    unknown = sorted(set(given) - owners.keys())
    if unknown:
        raise ConfigError(f"unknown setting(s) for {what}: {', '.join(unknown)}; known: {', '.join(sorted(owners))}")
    for name, value in given.items():
        per_class[owners[name]][name] = value
    return per_class
