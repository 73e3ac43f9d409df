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
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from neurallm._version import __version__
from neurallm.config import (
    CONTEXT_HELP, EvalConfig, EvalMethods, EvalReport, ExplainConfig, LoadSettings, ModelConfig, ScoreConfig, ScoreInput,
    TrainConfig,
)
from neurallm.data.settings import DATA_SETTINGS
from neurallm.data.sources import SourceSettings
from neurallm.data.vocab import VocabSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.elastic import DEFAULT_DDP_TIMEOUT
from neurallm.errors import ConfigError, NeurallmError, PeerLostError
from neurallm.run_config import TRAIN_SETTINGS
from neurallm.settings import Setting, format_value, settings_of



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
    help_text = help_text.replace("%", "%%")  # argparse %-formats help texts: "within 0.05%" must stay text
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


def _add_load_flag(p, name: str) -> None:
    """A flag of :class:`LoadSettings` whose value is its default unless given (the commands pass it on as it is)."""
    [s] = [s for s in settings_of(LoadSettings) if s.name == name]
    add_setting_flag(p, s)
    p.set_defaults(**{s.name: s.default})


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    _add_load_flag(p, "device")


def _add_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    _add_load_flag(p, "checkpoint")


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
    g.add_argument("--ddp-timeout", type=float, default=DEFAULT_DDP_TIMEOUT, metavar="SECONDS",
                   help=_with_default("under torchrun: seconds a process waits for the others before it stops with "
                                      "one line (a stalled peer; a dead one is reported at once)", DEFAULT_DDP_TIMEOUT))
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
    from neurallm.outputs import check_output_path

    for flag, path in (("--save", args.save), ("--onnx-export", args.onnx_export)):
        if path is not None:  # checked before training (never one of the run's own files), and again when written
            check_output_path(path, flag, runs=(Path(args.out),))
    export_onnx = _onnx_exporter() if args.onnx_export else None  # fails before training if export is missing
    progress = False if args.no_progress else None
    result = train(args.data, args.out, resume=args.resume, force=args.force, progress=progress,
                   save_every=args.save_every, ddp_timeout=args.ddp_timeout, **settings)
    if not _is_main_process():  # under torchrun, rank 0 alone writes files and prints
        return 0
    if args.save:
        _copy_best_weights(result.run_dir, args.save)
    if export_onnx is not None:
        export_onnx(result.run_dir, args.onnx_export, flag="--onnx-export")
        print(f"exported the best model to {args.onnx_export} (ONNX)")
    return 0


def _copy_best_weights(run_dir: Path, dest: str) -> None:
    import shutil

    from neurallm.outputs import check_output_path, output_path
    from neurallm.runfolder import BEST_FILE

    with output_path(check_output_path(dest, "--save", runs=(run_dir,))) as tmp:
        shutil.copyfile(run_dir / BEST_FILE, tmp)
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
    add_setting_flags(p, "evaluation", EvalConfig, EvalReport, LoadSettings)
    add_setting_flags(p, "evaluation-time methods (README: Cache pointer and dynamic evaluation)", EvalMethods)


def cmd_eval(args: argparse.Namespace) -> int:
    from neurallm.api import load_run

    evaluation, report = EvalConfig(**given_settings(args, EvalConfig)), EvalReport(**given_settings(args, EvalReport))
    EvalMethods(**given_settings(args, EvalMethods))  # contradicting methods fail before the model is loaded
    run = load_run(args.run, **given_settings(args, LoadSettings))
    source = given_settings(args, SourceSettings)
    if report.compare_batch_sizes:
        rows = run.compare_batch_sizes(list(report.compare_batch_sizes), args.data, split=evaluation.split,
                                       context=evaluation.context, **source)
        if args.json:
            print(json.dumps(rows))
        else:
            from neurallm.evaluation import format_comparison

            print(format_comparison(rows))
        return 0
    result = run.evaluate(args.data, **given_settings(args, EvalConfig, EvalMethods), **source)
    summary = {"split": evaluation.split, **result.to_dict(run.level)}
    if args.json:
        print(json.dumps(summary))
    else:
        bpc = f" | bpc {result.bpc:.4f}" if run.level == "char" or result.chars_per_token else ""
        bpc += f" | bpb {result.bpb:.4f}" if result.bpb is not None else ""
        print(f"{evaluation.split}: loss {result.loss:.4f} | ppl {result.ppl:.2f}{bpc} | tokens {result.tokens:,} | "
              f"<unk> {result.unk_share:.1%} | {result.method}, batch size {result.batch_size}, {result.precision} | "
              f"{result.seconds:.1f}s")
    return 0


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    from neurallm.sampling import SamplingSettings

    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    add_setting_flags(p, "sampling", SamplingSettings)
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the text before the first TEXT it makes (repeat for several) (default: none)")
    p.add_argument("--out", "--outf", help="write the text to this file (--outf: the PyTorch example's name) "
                                           "(default: standard output)")
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from neurallm.api import load_run
    from neurallm.outputs import check_output_path, output_text

    # checked before the model loads: never a run's own file; `-` is standard output
    target = check_output_path(args.out, "--out", stdout=True, what="the text") if args.out else None
    from neurallm.sampling import SamplingSettings

    settings = SamplingSettings(**given_settings(args, SamplingSettings))  # checked before the run is loaded
    args.prompt = _argv_text(args.prompt, "--prompt")  # bytes that are not UTF-8: U+FFFD, with a note
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    settings = {**asdict(run.sampling(settings)), "stop": args.stop or ()}
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
    if target is not None and not target.is_stdout:
        with output_text(target) as f:
            try:
                result = run.generate(args.prompt, on_text=stream(f.write, f.flush if target.through else lambda: None), **settings)
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
        where = f" to {args.out}" if target is not None and not target.is_stdout else ""
        print(f"neurallm generate: interrupted; wrote the {tokens:,} tokens made so far{where}", file=sys.stderr)
        return 130
    if result.prompt_unknown:
        shown = " ".join(sorted(set(result.prompt_unknown))[:10])
        print(f"note: {len(result.prompt_unknown)} prompt token(s) not in the vocabulary, read as <unk>: {shown}", file=sys.stderr)
    if target is not None and not target.is_stdout:
        print(f"wrote {tokens:,} tokens to {args.out}", file=sys.stderr)
    return 0


def add_score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    given = p.add_mutually_exclusive_group(required=True)
    for s in settings_of(ScoreInput):
        add_setting_flag(given if s.name in ("text", "file", "jsonl") else p, s)
    add_setting_flags(p, "scoring", ScoreConfig)
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def _score_input(args: argparse.Namespace) -> Iterator[str]:
    """The lines ``score`` reads from --text, --file or --jsonl (one line per JSONL record), read as they are scored:
    a file of any size is never held whole."""
    if args.jsonl is not None and not args.text_field:
        raise ConfigError("--jsonl needs --text-field K, the key that holds each record's text")
    if args.jsonl is None and args.text_field:
        raise ConfigError("--text-field applies to --jsonl only; drop it")
    if args.text is not None:
        return iter(_argv_text(args.text, "--text").splitlines() or [""])
    flag = "--file" if args.file else "--jsonl"
    path = Path(args.file or args.jsonl)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    return _read_lines(path, flag, args.text_field if args.jsonl else None)


def _read_lines(path: Path, flag: str, text_field: str | None) -> Iterator[str]:
    from neurallm.data.sources import _jsonl_texts

    try:
        with open(path, encoding="utf-8") as f:
            if text_field is not None:  # one line per record, as `--data F.jsonl --text-field K` reads it
                yield from _jsonl_texts(f, path=path, field_name=text_field, drop_empty=False)
            else:
                for line in f:
                    yield line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{flag} {path} is not UTF-8 text ({exc.reason} near byte {exc.start} of a block); "
                          "convert it to UTF-8") from None


def _argv_text(text: str, flag: str) -> str:
    """A text given on the command line, with bytes that were not UTF-8 read as U+FFFD (and a note saying so)."""
    from neurallm.data.tokenizers import replace_undecodable

    text, replaced = replace_undecodable(text)
    if replaced:
        print(f"note: {flag} held {replaced} byte(s) that are not UTF-8; each was read as U+FFFD", file=sys.stderr)
    return text


def cmd_score(args: argparse.Namespace) -> int:
    from neurallm.api import load_run, warn_if_many_unknown
    from neurallm.scoring import score_lines

    scoring = ScoreConfig(**given_settings(args, ScoreConfig))  # checked before the run is loaded
    lines = _score_input(args)
    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    # each line is printed as soon as it is scored: memory holds a piece of the text, never all of it
    logprob = 0.0
    n_tokens = n_unknown = 0
    for number, line in enumerate(score_lines(run.model, run.vocab, run.config.tokenizer, lines, independent=scoring.independent,
                                              bptt=run.config.train.bptt, context=scoring.context), start=1):
        logprob, n_tokens, n_unknown = logprob + line.logprob, n_tokens + len(line.tokens), n_unknown + line.unknown
        if args.json:
            print(json.dumps({"line": number, **line.to_dict()}, ensure_ascii=False))
        else:
            print(f"{line.logprob:12.3f} {len(line.tokens):6d} {line.ppl:10.2f}  {line.text}")
    share = n_unknown / max(1, n_tokens)
    warn_if_many_unknown(share, "scored tokens")
    if not args.json:
        ppl = math.exp(min(-logprob / max(1, n_tokens), 700.0))
        print(f"total: logprob {logprob:.3f} | tokens {n_tokens:,} | ppl {ppl:.2f} | <unk> {share:.1%}", file=sys.stderr)
    return 0


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", metavar="FILE", help=_with_default("ONNX file to write (any model); --onnx or --hf", "none"))
    target.add_argument("--hf", metavar="DIR", help=_with_default(
        "new or empty folder to write a Hugging Face transformers model and tokenizer into (a Transformer without "
        "--memory and without an output bias, its default); --onnx or --hf", "none"))
    _add_checkpoint_flag(p)


def cmd_export(args: argparse.Namespace) -> int:
    if args.hf is not None:
        from neurallm.integrations.hf_export import export_hf

        print(f"exported {args.run} to {export_hf(Path(args.run), Path(args.hf), checkpoint=args.checkpoint)} "
              "(Hugging Face transformers, GPT-NeoX)")
        return 0
    export_onnx = _onnx_exporter()
    out = export_onnx(Path(args.run), args.onnx, checkpoint=args.checkpoint)
    # with `--onnx -` the model itself went to standard output: the note goes to standard error
    print(f"exported {args.run} to {out} (ONNX)", file=sys.stderr if args.onnx == "-" else sys.stdout)
    return 0


def add_lm_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the harness's own flags (`lm-eval run --help`): --tasks T, --include-path DIR, --limit N, "
                        "--output_path DIR, ...; --model and --model_args are set to the run")


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from neurallm.integrations.lm_eval import run_harness_cli
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lm_eval"):
            raise
        raise ConfigError("neurallm lm-eval needs lm-evaluation-harness: pip install 'neurallm[eval]'") from None
    return run_harness_cli(args.run, args.harness_args)


def add_explain_flags(p: argparse.ArgumentParser) -> None:
    add_setting_flags(p, "what to draw", ExplainConfig)


def cmd_explain(args: argparse.Namespace) -> int:
    from neurallm.explain import explain_evaluation, explain_training, parse_explain_text, should_use_color

    config = ExplainConfig(**given_settings(args, ExplainConfig))
    tokens = parse_explain_text(config.text, config.numbers)
    color = should_use_color(sys.stdout)
    if config.eval:
        print(explain_evaluation(tokens, config.compare_batch_sizes, context=config.context, color=color))
    else:
        print(explain_training(tokens, config.batch_size, config.bptt, color=color))
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


API_KEY_VARIABLE = "NEURALLM_API_KEY"


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    from neurallm.config import ServeConfig

    p.add_argument("run", help="run directory")
    add_setting_flags(p, "server", ServeConfig)
    _add_checkpoint_flag(p)
    _add_device_flag(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from neurallm.config import ServeConfig
    from neurallm.server import serve

    import os

    settings = given_settings(args, ServeConfig)
    if "api_key" not in settings and os.environ.get(API_KEY_VARIABLE):  # a key in argv shows in `ps`; this does not
        settings["api_key"] = os.environ[API_KEY_VARIABLE]
    serve(args.run, ServeConfig(**settings), checkpoint=args.checkpoint, device=args.device)
    return 0


def add_plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to overlay")
    p.add_argument("--out", required=True, help="PNG file to write")


def cmd_plot(args: argparse.Namespace) -> int:
    from neurallm.plots import plot_runs

    out = plot_runs([Path(run) for run in args.runs], args.out)
    print(f"wrote {out}", file=sys.stderr if args.out == "-" else sys.stdout)  # `--out -`: the PNG is on stdout
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
    "export": Subcommand("export a run's model to ONNX (its state as explicit inputs and outputs) or to Hugging Face "
                         "transformers", add_export_flags, cmd_export),
    "lm-eval": Subcommand("evaluate a run with lm-evaluation-harness (its command line, the run as the model)",
                          add_lm_eval_flags, cmd_lm_eval),
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


def configure_logging(json_output: bool = False) -> None:
    """The library logs through ``logging.getLogger("neurallm....")``; the command prints the training log (INFO)
    on standard output, as the PyTorch example does, and warnings on standard error. With ``json_output`` (a
    command's ``--json``) standard output carries the JSON alone: INFO lines are not printed."""
    logger = logging.getLogger("neurallm")
    if not any(isinstance(h, _PlainLines) for h in logger.handlers):
        out, err = _PlainLines("stdout"), _PlainLines("stderr")
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err.setLevel(logging.WARNING)
        logger.addHandler(out)
        logger.addHandler(err)
    # under torchrun, rank 0 speaks for all: the other ranks log errors only
    if not _is_main_process():
        logger.setLevel(logging.ERROR)
    else:
        logger.setLevel(logging.WARNING if json_output else logging.INFO)
    logger.propagate = False  # the lines are printed once, here, not again by a root handler


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (``--debug`` for the traceback) and return non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(json_output=getattr(args, "json", False))
    try:
        if args.command in ("train", "eval", "generate", "score"):  # only commands that run a model load torch
            from neurallm.runtime import keep_freed_memory

            keep_freed_memory()  # a process-wide setting: the command owns its process, the library does not
        return SUBCOMMANDS[args.command].run(args)
    except NeurallmError as exc:
        if args.debug:
            raise
        # under torchrun every rank stops with the same error and one prints it; a lost peer, each survivor
        if _is_main_process() or isinstance(exc, PeerLostError):
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
