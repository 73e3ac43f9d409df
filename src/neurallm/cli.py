"""The ``neurallm`` command: the only place that reads ``sys.argv``. Each subcommand calls the Python API.

Settings flags are generated from the settings dataclasses' fields (:mod:`neurallm.settings`; how to add one
is in :mod:`neurallm.config`), so they keep the PyTorch word-language-model example's names (``--model --emsize
--nhid --nlayers --lr --clip --epochs --batch-size --bptt --dropout --tied --seed``). They default to None
here so that the settings a user actually typed are known: ``--resume`` compares exactly those against the
saved run; ``--help`` shows the dataclass default.

A subcommand is one entry of :data:`SUBCOMMANDS`: a function that adds its flags and a function that runs it.
Abbreviated flags are refused everywhere (``--save 60`` must not silently mean ``--save-every 60``); the
PyTorch example's own spellings are accepted as aliases (``--batch_size``, ``--save``, ``--onnx-export``,
``--dry-run``, ``generate --words --outf``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neurallm import __version__
from neurallm.config import (
    AMP_MODES, CACHE_LAMBDA, CACHE_THETA, CONTEXT_AUTO, CONTEXT_HELP, DATA_SETTINGS, DEVICES, DYNAMIC_DECAY, DYNAMIC_LR,
    EVAL_AMP, EVAL_BATCH_SIZE, TRAIN_SETTINGS, ModelConfig, TrainConfig,
)
from neurallm.data.sources import SourceSettings
from neurallm.data.vocab import VocabSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.errors import ConfigError, NeurallmError
from neurallm.settings import Setting, format_value, settings_of

DEFAULT_TOKENS = 1000


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,5,10,20,80, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _with_default(help_text: str, default) -> str:
    return f"{help_text} (default: {format_value(default)})"


# --- flags generated from the settings dataclasses --------------------------------------------------------------

def _argparse_type(s: Setting) -> Callable[[str], object]:
    if s.parse is None:
        return s.kind  # argparse names it in its message: "--bptt: invalid int value: 'abc'"

    def parse(text: str):
        try:
            return s.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_setting_flag(group, s: Setting, *, required: bool = False, default_text: str | None = None) -> None:
    """Add the flag of one setting; its value stays None unless the user gives it.

    ``default_text`` describes the default where it depends on the subcommand (``eval --data``: the run's own).
    """
    names = (s.flag, *s.aliases)
    if required:
        help_text = f"{s.help} (required)"
    elif default_text is not None:
        help_text = f"{s.help} (default: {default_text})"
    else:
        help_text = s.help_with_default()
    if s.kind is bool:
        # --no-FLAG too: a preset's switch (cpu-fast's --adaptive-softmax, awd-wt2's --tied) can be turned off
        group.add_argument(*names, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        # the placeholder follows the flag, not the field: `--context N`'s value is named CONTEXT, not EVAL_CONTEXT
        metavar = s.metavar or (None if s.choices else s.flag.lstrip("-").replace("-", "_").upper())
        group.add_argument(*names, dest=s.name, type=_argparse_type(s), choices=s.choices, metavar=metavar,
                           required=required, help=help_text)


def add_setting_flags(parser: argparse.ArgumentParser, title: str, *classes: type,
                      required: tuple[str, ...] = (), default_texts: dict[str, str] | None = None) -> None:
    """One argument group with a flag per setting of ``classes``."""
    group = parser.add_argument_group(title)
    for s in settings_of(*classes):
        add_setting_flag(group, s, required=s.name in required, default_text=(default_texts or {}).get(s.name))


def given_settings(args: argparse.Namespace, *classes: type) -> dict:
    """The settings of ``classes`` the user typed (argparse leaves the others None); ``--data`` is passed apart."""
    return {s.name: getattr(args, s.name) for s in settings_of(*classes)
            if s.name != "data" and getattr(args, s.name, None) is not None}


def _add_data_flags(p: argparse.ArgumentParser, *, data_default: str | None) -> None:
    """The data group; ``data_default`` None makes ``--data`` required."""
    if data_default is None:
        add_setting_flags(p, "data", SourceSettings, required=("data",))
    else:
        add_setting_flags(p, "data", SourceSettings, default_texts={"data": data_default})


def _add_context_flag(p: argparse.ArgumentParser, default_text: str, *, default: int | None = None) -> None:
    p.add_argument("--context", type=int, default=default, help=f"{CONTEXT_HELP} (default: {default_text})")


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help=_with_default("where to run", "auto"))


def _add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", choices=["best", "last"], default="best",
                   help=_with_default("best: model.safetensors (best on validation); last: last.safetensors (an NT-ASGD run "
                                      "that has begun averaging: its running average, which validation scores)", "best"))


# --- subcommands: one function adds the flags, one runs it ------------------------------------------------------

def add_prepare_flags(p: argparse.ArgumentParser) -> None:
    _add_data_flags(p, data_default=None)
    add_setting_flags(p, "tokens and vocabulary", TokenizerSettings, VocabSettings)
    p.add_argument("--out", help="folder to write (default: the cache, keyed by data and settings)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from neurallm.data.prepare import prepare  # not neurallm.api: preparing needs no torch

    prepared = prepare(args.data, args.out, **given_settings(args, *DATA_SETTINGS))
    print(f"prepared {prepared.folder} (vocabulary {len(prepared.vocab):,})")
    return 0


def add_train_flags(p: argparse.ArgumentParser) -> None:
    from neurallm.presets import PRESETS, presets_help

    p.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=presets_help() + " (default: none)")
    _add_data_flags(p, data_default="none; required unless --resume")
    add_setting_flags(p, "tokens and vocabulary", TokenizerSettings, VocabSettings)
    add_setting_flags(p, "model", ModelConfig)
    add_setting_flags(p, "training", TrainConfig)
    g = p.add_argument_group("run directory and outputs")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory (required)")
    g.add_argument("--resume", action="store_true", help="continue --out from last.safetensors")
    g.add_argument("--force", action="store_true", help="replace an existing run directory")
    g.add_argument("--save-every", type=float, default=300.0, metavar="SECONDS",
                   help=_with_default("seconds between mid-epoch checkpoints", 300))
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain progress lines instead, as when stderr is not a terminal")
    g.add_argument("--save", metavar="FILE", help="also write the best weights to FILE when training ends, as "
                   "safetensors (the PyTorch example's --save; the run directory keeps them as model.safetensors) "
                   "(default: none)")
    g.add_argument("--onnx-export", metavar="FILE",
                   help="export the best model to FILE as ONNX when training ends (the PyTorch example's --onnx-export) "
                        "(default: none)")


def cmd_train(args: argparse.Namespace) -> int:
    from neurallm.api import train

    from neurallm.presets import with_preset

    settings = with_preset(args.preset, given_settings(args, *TRAIN_SETTINGS))
    if not args.resume and args.data is None:
        raise ConfigError("train needs --data (a folder, file or dataset name); or --resume an existing --out")
    if args.resume and args.force:
        raise ConfigError("--resume and --force contradict each other: --resume continues --out, --force replaces it")
    for flag, path in (("--save", args.save), ("--onnx-export", args.onnx_export)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{flag} {path}: the folder {Path(path).parent} does not exist; create it or name another file")
    export_onnx = _onnx_exporter() if args.onnx_export else None  # fails before training if export is missing
    progress = False if args.no_progress else None
    result = train(args.data, args.out, resume=args.resume, force=args.force, progress=progress,
                   save_every=args.save_every, **settings)
    if not _is_main_process():  # under torchrun, rank 0 alone writes files and prints
        return 0
    if args.save:
        _copy_best_weights(result.run_dir, Path(args.save))
    if export_onnx is not None:
        export_onnx(result.run_dir, Path(args.onnx_export))
        print(f"exported the best model to {args.onnx_export} (ONNX)")
    return 0


def _copy_best_weights(run_dir: Path, dest: Path) -> None:
    import shutil

    from neurallm.fileio import atomic_write
    from neurallm.training.checkpoint import BEST_FILE

    atomic_write(dest, lambda tmp: shutil.copyfile(run_dir / BEST_FILE, tmp))
    print(f"wrote the best weights to {dest} (safetensors, as {run_dir / BEST_FILE})")


def _onnx_exporter() -> Callable[[Path, Path], object]:
    """``neurallm.export.export_onnx(run_dir, out_file)``, the function behind ``neurallm export RUN --onnx FILE``.

    ``train --onnx-export FILE`` calls it after training, as the PyTorch example exports after training.
    """
    try:
        from neurallm.export import export_onnx
    except ModuleNotFoundError as exc:
        if exc.name != "neurallm.export":
            raise ConfigError(f"ONNX export needs the package {exc.name}: pip install 'neurallm[onnx]'") from None
        raise
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # the exporter imports it only when it runs: check before training
        raise ConfigError("--onnx-export needs the package onnx: pip install 'neurallm[onnx]' (or train without --onnx-export)")
    return export_onnx


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    _add_data_flags(p, data_default="the run's own corpus")
    g = p.add_argument_group("evaluation")
    g.add_argument("--split", choices=["train", "valid", "test"], default="test", help=_with_default("split to score", "test"))
    g.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help=_with_default("columns evaluated in parallel (does not change the exact result)", EVAL_BATCH_SIZE))
    _add_context_flag(g, CONTEXT_AUTO)
    g.add_argument("--naive", action="store_true", help="the PyTorch example's method (its result depends on --batch-size)")
    m = p.add_argument_group("evaluation-time methods (README: Cache pointer and dynamic evaluation)")
    m.add_argument("--cache-pointer", type=int, metavar="N",
                   help="mix in a continuous cache pointer over the last N hidden states (default: off)")
    m.add_argument("--theta", type=float, default=CACHE_THETA, help=_with_default("cache pointer: sharpness of the match", CACHE_THETA))
    m.add_argument("--lambda", dest="lambda_", type=float, default=CACHE_LAMBDA,
                   help=_with_default("cache pointer: weight of the cache in the mixture", CACHE_LAMBDA))
    m.add_argument("--dynamic", action="store_true", help="dynamic evaluation: adapt the weights to each window after scoring it (one column)")
    m.add_argument("--dynamic-lr", type=float, default=DYNAMIC_LR,
                   help=_with_default("dynamic evaluation: SGD learning rate (tune it on --split valid)", DYNAMIC_LR))
    m.add_argument("--dynamic-decay", type=float, default=DYNAMIC_DECAY,
                   help=_with_default("dynamic evaluation: pull back towards the trained weights per window", DYNAMIC_DECAY))
    m.add_argument("--dynamic-window", type=int, metavar="TOKENS",
                   help="dynamic evaluation: tokens per update (default: the run's --bptt)")
    g.add_argument("--compare-batch-sizes", type=_int_list, metavar="B1,B2,...",
                   help="print a table of naive vs exact perplexity per batch size (default: none)")
    g.add_argument("--amp", choices=AMP_MODES, default=EVAL_AMP,
                   help=_with_default("bf16: exact evaluation's matrix products in bfloat16 (within 0.05%% of float32; "
                                      "refused without bfloat16 hardware); auto: bf16 where the hardware has it; "
                                      "none: float32", EVAL_AMP))
    _add_checkpoint_flag(g)
    _add_device_flag(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    from neurallm.api import load_run

    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    source = given_settings(args, SourceSettings)
    if args.compare_batch_sizes:
        rows = run.compare_batch_sizes(args.compare_batch_sizes, args.data, split=args.split, context=args.context, **source)
        if args.json:
            print(json.dumps(rows))
        else:
            from neurallm.evaluation import format_comparison

            print(format_comparison(rows))
        return 0
    from neurallm.evaluation_methods.cache_pointer import CachePointerSettings
    from neurallm.evaluation_methods.dynamic_eval import DynamicSettings

    if args.cache_pointer is not None and args.dynamic:
        raise ConfigError("--cache-pointer and --dynamic are separate methods; run them one at a time")
    pointer = None if args.cache_pointer is None else CachePointerSettings(args.cache_pointer, args.theta, args.lambda_)
    dynamic = (DynamicSettings(args.dynamic_lr, args.dynamic_decay, args.dynamic_window or run.config.train.bptt)
               if args.dynamic else None)
    result = run.evaluate(args.data, split=args.split, batch_size=args.batch_size, context=args.context, naive=args.naive,
                          cache_pointer=pointer, dynamic=dynamic, amp=args.amp, **source)
    summary = {"split": args.split, **result.to_dict(run.level)}
    if args.json:
        print(json.dumps(summary))
    else:
        bpc = f" | bpc {result.bpc:.4f}" if run.level == "char" or result.chars_per_token else ""
        bpc += f" | bpb {result.bpb:.4f}" if result.bpb is not None else ""
        print(f"{args.split}: loss {result.loss:.4f} | ppl {result.ppl:.2f}{bpc} | tokens {result.tokens:,} | "
              f"<unk> {result.unk_share:.1%} | {result.method}, batch size {result.batch_size}, {result.precision} | "
              f"{result.seconds:.1f}s")
    return 0


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--tokens", "--words", type=int, default=DEFAULT_TOKENS,
                   help=_with_default("tokens to generate, at most 1,000,000, printed as they are made "
                                      "(--words: the PyTorch example's name)", DEFAULT_TOKENS))
    p.add_argument("--temperature", type=float, default=1.0, help=_with_default("0 = greedy", 1.0))
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding probability P (default: 1)")
    p.add_argument("--seed", type=int, default=1111, help=_with_default("random seed; the same seed gives the same text", 1111))
    _add_context_flag(p, "bptt + memory; RNNs carry their whole history in their state")
    p.add_argument("--out", "--outf", help="write the text to this file (--outf: the PyTorch example's name) "
                                           "(default: standard output)")
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def _check_generate_out(out: Path, run: Path) -> None:
    """--out must be a file outside the run folder: writing into it could replace a run file."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a file for the text")
    if run.is_dir() and out.resolve().is_relative_to(run.resolve()):
        raise ConfigError(f"--out {out} is inside the run folder {run}; write the text somewhere else")


def cmd_generate(args: argparse.Namespace) -> int:
    from neurallm.api import load_run
    from neurallm.fileio import atomic_path

    if args.out:
        _check_generate_out(Path(args.out), Path(args.run))
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    settings = dict(tokens=args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, context=args.context)
    pieces = [0]  # pieces written so far: the prompt's, then one per token

    def stream(write: Callable[[str], object], flush: Callable[[], None]) -> Callable[[str], None]:
        def on_text(piece: str) -> None:
            write(piece)
            flush()
            pieces[0] += 1
        return on_text

    # The text is written as it is made, so Ctrl-C keeps what was generated (a file still appears whole: the
    # temp file is renamed into place with what it holds).
    result, interrupted = None, False
    if args.out:
        with atomic_path(Path(args.out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            try:
                result = run.generate(args.prompt, on_text=stream(f.write, lambda: None), **settings)
            except KeyboardInterrupt:
                interrupted = True
    else:
        try:
            result = run.generate(args.prompt, on_text=stream(sys.stdout.write, sys.stdout.flush), **settings)
            print()
        except KeyboardInterrupt:
            interrupted = True
            print(flush=True)
    tokens = max(0, pieces[0] - 1)
    if interrupted:
        where = f" to {args.out}" if args.out else ""
        print(f"neurallm generate: interrupted; wrote the {tokens:,} tokens made so far{where}", file=sys.stderr)
        return 130
    if result.prompt_unknown:
        shown = " ".join(sorted(set(result.prompt_unknown))[:10])
        print(f"note: {len(result.prompt_unknown)} prompt token(s) not in the vocabulary, read as <unk>: {shown}", file=sys.stderr)
    if args.out:
        print(f"wrote {tokens:,} tokens to {args.out}", file=sys.stderr)
    return 0


def add_score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="the text to score; its lines are scored one by one (default: none)")
    given.add_argument("--file", metavar="F", help="a UTF-8 text file to score, line by line (default: none)")
    given.add_argument("--jsonl", metavar="F", help="a JSONL file: one record per line, its text under --text-field (default: none)")
    p.add_argument("--text-field", metavar="K", help="JSONL key holding each record's text (required with --jsonl) (default: none)")
    p.add_argument("--independent", action="store_true",
                   help="score each line alone (a cold state) instead of with the lines before it as context")
    _add_context_flag(p, "the model's, as eval (RNNs carry their whole history)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input line")
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def _score_input(args: argparse.Namespace) -> str:
    """The text ``score`` reads from --text, --file or --jsonl (one line per JSONL record)."""
    from neurallm.data.sources import _jsonl_texts

    if args.jsonl is not None and not args.text_field:
        raise ConfigError("--jsonl needs --text-field K, the key that holds each record's text")
    if args.jsonl is None and args.text_field:
        raise ConfigError("--text-field applies to --jsonl only; drop it")
    if args.text is not None:
        return args.text
    path = Path(args.file or args.jsonl)
    if not path.is_file():
        raise ConfigError(f"{'--file' if args.file else '--jsonl'} {path}: no such file")
    try:
        if args.jsonl:  # one line per record, as `--data F.jsonl --text-field K` reads it
            with open(path, encoding="utf-8") as f:
                return "\n".join(_jsonl_texts(f, path=path, field_name=args.text_field))
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{'--file' if args.file else '--jsonl'} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None


def cmd_score(args: argparse.Namespace) -> int:
    from neurallm.api import load_run

    text = _score_input(args)
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    (score,) = run.score([text], independent=args.independent, context=args.context)
    for number, line in enumerate(score.lines, start=1):
        if args.json:
            print(json.dumps({"line": number, **line.to_dict()}, ensure_ascii=False))
        else:
            print(f"{line.logprob:12.3f} {len(line.tokens):6d} {line.ppl:10.2f}  {line.text}")
    if not args.json:
        share = score.unknown / max(1, len(score.tokens))
        print(f"total: logprob {score.logprob:.3f} | tokens {len(score.tokens):,} | ppl {score.ppl:.2f} | <unk> {share:.1%}",
              file=sys.stderr)
    return 0


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write (required)")
    _add_checkpoint_flag(p)


def cmd_export(args: argparse.Namespace) -> int:
    export_onnx = _onnx_exporter()
    print(f"exported {args.run} to {export_onnx(Path(args.run), Path(args.onnx), checkpoint=args.checkpoint)} (ONNX)")
    return 0


def add_explain_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="a short text to use as the token stream (default: none)")
    p.add_argument("--range", dest="numbers", metavar="FIRST..LAST", help="numbers as the token stream, e.g. 1..40 (default: none)")
    p.add_argument("--batch-size", type=int, default=4, help=_with_default("columns of the batchified matrix", 4))
    p.add_argument("--bptt", type=int, default=2, help=_with_default("tokens per BPTT window", 2))
    p.add_argument("--eval", action="store_true", help="the evaluation view: naive layouts against exact, per batch size")
    p.add_argument("--compare-batch-sizes", "--eval-batch-sizes", type=_int_list, default=[8, 6], metavar="B1,B2,...",
                   help=_with_default("batch sizes of the --eval view", "8,6"))
    _add_context_flag(p, "4 (the burn-in of the exact layout in the --eval view)", default=4)


def cmd_explain(args: argparse.Namespace) -> int:
    from neurallm.explain import explain_evaluation, explain_training, parse_explain_text, should_use_color

    tokens = parse_explain_text(args.text, args.numbers)
    color = should_use_color(sys.stdout)
    if args.eval:
        print(explain_evaluation(tokens, tuple(args.compare_batch_sizes), context=args.context, color=color))
    else:
        print(explain_training(tokens, args.batch_size, args.bptt, color=color))
    return 0


def add_datasets_flags(p: argparse.ArgumentParser) -> None:
    pass  # no flags: it lists what is known


def cmd_datasets(args: argparse.Namespace) -> int:
    from neurallm.data import registry

    for name, spec in sorted(registry.DATASETS.items()):
        local = registry.find_local(name)
        where = f"found at {local}" if local else f"downloads from {spec.files[0].url}"
        print(f"{name:16} {spec.level:5} {spec.description} — {where}")
    return 0


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from neurallm.config import ServeConfig

    p.add_argument("run", help="run directory")
    add_setting_flags(p, "server", ServeConfig)
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from neurallm.config import ServeConfig
    from neurallm.server import serve

    serve(args.run, ServeConfig(**given_settings(args, ServeConfig)), checkpoint=args.checkpoint, device=args.device)
    return 0


def add_plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to overlay")
    p.add_argument("--out", required=True, help="PNG file to write")


def cmd_plot(args: argparse.Namespace) -> int:
    from neurallm.plots import plot_runs

    print(f"wrote {plot_runs([Path(run) for run in args.runs], Path(args.out))}")
    return 0


@dataclass(frozen=True)
class Subcommand:
    """One ``neurallm`` subcommand: its one-line help, a function adding its flags, and the function running it."""

    help: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "prepare": Subcommand("tokenize a corpus and write its id streams and vocabulary", add_prepare_flags, cmd_prepare),
    "train": Subcommand("train a model into a run directory", add_train_flags, cmd_train),
    "eval": Subcommand("evaluate a run: loss, perplexity, tokens scored (bpc at char level)", add_eval_flags, cmd_eval),
    "generate": Subcommand("sample text from a run", add_generate_flags, cmd_generate),
    "score": Subcommand("log-probability, token count and perplexity of each line of a text", add_score_flags, cmd_score),
    "export": Subcommand("export a run's model to ONNX, its state as explicit inputs and outputs", add_export_flags, cmd_export),
    "explain": Subcommand("show how a text is batchified and cut into BPTT windows", add_explain_flags, cmd_explain),
    "datasets": Subcommand("list the registered datasets and where each is found", add_datasets_flags, cmd_datasets),
    "serve": Subcommand("serve a run: a web page and an HTTP API (generate, stream, score)", add_serve_flags, cmd_serve),
    "plot": Subcommand("draw the training curves of one or more runs into one PNG", add_plot_flags, cmd_plot),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurallm", description="Train, evaluate and sample neural language models.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"neurallm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command_parser = sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        command.add_flags(command_parser)
        # `neurallm train --debug …` works as well as `neurallm --debug train …`; SUPPRESS leaves the top-level
        # value alone when the flag is not repeated after the subcommand.
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


def _is_main_process() -> bool:
    """False in the processes torchrun starts besides rank 0 (read from the environment: no torch import)."""
    import os

    return os.environ.get("RANK", "0") == "0"


class _PlainLines(logging.StreamHandler):
    """Each log record as its bare message on ``sys.stdout`` or ``sys.stderr``, flushed at once even when that is a
    file or a pipe. The stream is looked up at each record, so pytest's capture and later redirections are honoured."""

    def __init__(self, stream_name: str) -> None:
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stdout / sys.stderr


def configure_logging() -> None:
    """The library logs through ``logging.getLogger("neurallm....")``; the command prints the training log (INFO)
    on standard output, as the PyTorch example does, and warnings on standard error (so ``eval --json`` prints its
    one object alone)."""
    logger = logging.getLogger("neurallm")
    if not any(isinstance(h, _PlainLines) for h in logger.handlers):
        out, err = _PlainLines("stdout"), _PlainLines("stderr")
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        logger.addHandler(out)
        logger.addHandler(err)
    # under torchrun, rank 0 speaks for all: the other ranks log errors only
    logger.setLevel(logging.INFO if _is_main_process() else logging.ERROR)
    logger.propagate = False  # the lines are printed once, here, not again by a root handler


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (``--debug`` for the traceback) and return non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        if args.command in ("train", "eval", "generate", "score"):  # only commands that run a model load torch
            from neurallm.runtime import keep_freed_memory

            keep_freed_memory()  # a process-wide setting: the command owns its process, the library does not
        return SUBCOMMANDS[args.command].run(args)
    except NeurallmError as exc:
        if args.debug:
            raise
        if _is_main_process():  # under torchrun every rank stops with the same error; one prints it
            print(f"neurallm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(f"neurallm {args.command}: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"neurallm {args.command}: interrupted", file=sys.stderr)
        return 130
