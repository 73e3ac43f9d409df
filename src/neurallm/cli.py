"""The ``neurallm`` command: the only place that reads ``sys.argv``. Each subcommand calls the Python API.

Flags keep the PyTorch word-language-model example's names (``--model --emsize --nhid --nlayers --lr --clip
--epochs --batch-size --bptt --dropout --tied --seed``). Training flags default to None here so that the
settings a user actually typed are known: ``--resume`` compares exactly those against the saved run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from neurallm import __version__
from neurallm.errors import ConfigError, NeurallmError
from neurallm.runtime import keep_freed_memory

DEFAULT_TOKENS = 1000


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three fractions like 0.9,0.05,0.05, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 1,5,10,20,80, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _add_data_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, help="folder with train/valid/test, a text/CSV/JSONL file, a prepared folder, or a dataset name (wikitext-2, wikitext-103, ptb, tinyshakespeare)")
    g.add_argument("--format", choices=["auto", "dir", "text", "csv", "jsonl", "registry"], help="override format detection")
    g.add_argument("--text-column", help="CSV columns joined into one document per row, e.g. title,description")
    g.add_argument("--text-field", help="JSONL key holding the text")
    g.add_argument("--split-ratios", type=_ratios, help="train,valid,test fractions for a single file (default 0.9,0.05,0.05)")
    g.add_argument("--encoding", help="text encoding of the files, decoded strictly (default utf-8)")


def _add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokens and vocabulary")
    g.add_argument("--level", choices=["word", "char"], help="word (default): whitespace split, <eos> per line; char: characters")
    g.add_argument("--lowercase", action="store_true", default=None, help="lowercase the text")
    g.add_argument("--strip-punctuation", action="store_true", default=None, help="replace punctuation by spaces (word level)")
    g.add_argument("--min-freq", type=int, help="drop tokens seen fewer times in train (default 1)")
    g.add_argument("--max-vocab", type=int, help="cap the vocabulary size")


def _add_model_and_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="RNN_TANH, RNN_RELU, LSTM (default), GRU or Transformer")
    g.add_argument("--emsize", type=int, help="embedding size (default 200)")
    g.add_argument("--nhid", type=int, help="hidden units per layer; Transformer feed-forward width (default 200)")
    g.add_argument("--nlayers", type=int, help="layers (default 2)")
    g.add_argument("--dropout", type=float, help="dropout (default 0.2)")
    g.add_argument("--tied", action="store_true", default=None, help="tie embedding and output weights (RNNs: emsize must equal nhid)")
    g.add_argument("--nhead", type=int, help="Transformer attention heads (default 2)")
    g.add_argument("--memory", type=int, help="Transformer-XL memory: positions of the previous window attended to (default 0)")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, help="initial learning rate (default 20; use ~1e-3 with adamw)")
    g.add_argument("--clip", type=float, help="gradient clipping norm (default 0.25)")
    g.add_argument("--epochs", type=int, help="upper epoch limit (default 40)")
    g.add_argument("--batch-size", type=int, help="parallel streams (default 20)")
    g.add_argument("--bptt", type=int, help="sequence length (default 35)")
    g.add_argument("--seed", type=int, help="random seed (default 1111)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="sgd (default, lr/4 on plateau) or adamw (warm-up + cosine)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--warmup", type=int, help="AdamW warm-up steps (default 100)")
    g.add_argument("--max-time", type=float, help="stop after this many seconds of training")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    g.add_argument("--shuffle-windows", action="store_true", default=None, help="fixed windows in random order, state reset per window")
    g.add_argument("--eval-batch-size", type=int, help="columns for validation (default 10; does not change the result)")
    g.add_argument("--context", dest="eval_context", type=int, help="history per scored validation token (default 512 for stateful models)")
    g.add_argument("--log-interval", type=int, help="batches between progress-bar loss updates (default 50)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurallm", description="Train, evaluate and sample neural language models.")
    parser.add_argument("--version", action="version", version=f"neurallm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize a corpus and write its id streams and vocabulary")
    _add_data_flags(p, required=True)
    _add_tokenizer_flags(p)
    p.add_argument("--out", help="folder to write (default: the cache, keyed by data and settings)")

    p = sub.add_parser("train", help="train a model into a run directory")
    _add_data_flags(p, required=False)
    _add_tokenizer_flags(p)
    _add_model_and_training_flags(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue --out from last.safetensors")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between mid-epoch checkpoints (default 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="evaluate a run: loss, perplexity, tokens scored (bpc at char level)")
    p.add_argument("run", help="run directory")
    _add_data_flags(p, required=False)
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--batch-size", type=int, default=10, help="columns evaluated in parallel (default 10)")
    p.add_argument("--context", type=int, help="tokens of history per scored token (default 512 stateful, bptt/2 otherwise)")
    p.add_argument("--naive", action="store_true", help="the PyTorch example's method (depends on --batch-size)")
    p.add_argument("--compare-batch-sizes", type=_int_list, metavar="B1,B2,...", help="table of naive vs exact ppl per batch size")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="sample text from a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"tokens to generate, at most 1,000,000; printed as they are made (default {DEFAULT_TOKENS})")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=1111)
    p.add_argument("--context", type=int, help="Transformer KV-cache length (default bptt + memory)")
    p.add_argument("--out", help="write the text to this file instead of standard output")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    p = sub.add_parser("explain", help="show how a text is batchified and cut into BPTT windows")
    p.add_argument("--text", help="a short text to use as the token stream")
    p.add_argument("--range", dest="numbers", help="numbers FIRST..LAST as the token stream, e.g. 1..40")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bptt", type=int, default=2)
    p.add_argument("--eval", action="store_true", help="the evaluation view: naive 5×8 vs 6×6 layouts against exact")
    p.add_argument("--eval-batch-sizes", type=_int_list, default=[8, 6], metavar="B1,B2", help="batch sizes of the --eval view (default 8,6)")
    p.add_argument("--context", type=int, default=4, help="burn-in of the exact layout in the --eval view (default 4)")

    sub.add_parser("datasets", help="list the registered datasets and where each is found")
    for command_parser in sub.choices.values():
        # `neurallm train --debug …` works as well as `neurallm --debug train …`; SUPPRESS leaves the top-level
        # value alone when the flag is not repeated after the subcommand.
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


_DATA_KEYS = ("format", "text_column", "text_field", "split_ratios", "encoding")
_TOKENIZER_KEYS = ("level", "lowercase", "strip_punctuation", "min_freq", "max_vocab")
_TRAIN_KEYS = ("model", "emsize", "nhid", "nlayers", "dropout", "tied", "nhead", "memory", "lr", "clip", "epochs",
               "batch_size", "bptt", "seed", "optimizer", "weight_decay", "warmup", "max_time", "device",
               "shuffle_windows", "eval_batch_size", "eval_context", "log_interval")


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    """The settings the user typed (argparse leaves the others None)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_prepare(args: argparse.Namespace) -> int:
    from neurallm.api import prepare

    prepared = prepare(args.data, args.out, **_given(args, _DATA_KEYS + _TOKENIZER_KEYS))
    print(f"prepared {prepared.folder} (vocabulary {len(prepared.vocab):,})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from neurallm.api import train

    settings = _given(args, _DATA_KEYS + _TOKENIZER_KEYS + _TRAIN_KEYS)
    if not args.resume and args.data is None:
        raise ConfigError("train needs --data (a folder, file or dataset name); or --resume an existing --out")
    if args.resume and args.force:
        raise ConfigError("--resume and --force contradict each other: --resume continues --out, --force replaces it")
    progress = False if args.no_progress else None
    train(args.data, args.out, resume=args.resume, force=args.force, progress=progress, save_every=args.save_every, **settings)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from neurallm.api import load_run

    run = load_run(args.run, checkpoint=args.checkpoint, device=args.device)
    source = _given(args, _DATA_KEYS)
    if args.compare_batch_sizes:
        rows = run.compare_batch_sizes(args.compare_batch_sizes, args.data, split=args.split, context=args.context, **source)
        if args.json:
            print(json.dumps(rows))
        else:
            from neurallm.evaluation import format_comparison

            print(format_comparison(rows))
        return 0
    result = run.evaluate(args.data, split=args.split, batch_size=args.batch_size, context=args.context, naive=args.naive, **source)
    summary = {"split": args.split, **result.to_dict(run.level)}
    if args.json:
        print(json.dumps(summary))
    else:
        bpc = f" | bpc {result.bpc:.4f}" if run.level == "char" else ""
        print(f"{args.split}: loss {result.loss:.4f} | ppl {result.ppl:.2f}{bpc} | tokens {result.tokens:,} | "
              f"{result.method}, batch size {result.batch_size} | {result.seconds:.1f}s")
    return 0


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
    made = [0]  # tokens written so far (the prompt's piece comes first)

    def stream(write: Callable[[str], object], flush: Callable[[], None]) -> Callable[[str], None]:
        def on_text(piece: str) -> None:
            write(piece)
            flush()
            made[0] += 1
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
    tokens = max(0, made[0] - 1)
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


def cmd_explain(args: argparse.Namespace) -> int:
    from neurallm.explain import explain_evaluation, explain_training, parse_explain_text, should_use_color

    tokens = parse_explain_text(args.text, args.numbers)
    color = should_use_color(sys.stdout)
    if args.eval:
        print(explain_evaluation(tokens, tuple(args.eval_batch_sizes), context=args.context, color=color))
    else:
        print(explain_training(tokens, args.batch_size, args.bptt, color=color))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from neurallm.data import registry

    for name, spec in sorted(registry.DATASETS.items()):
        local = registry.find_local(name)
        where = f"found at {local}" if local else f"downloads from {spec.files[0].url}"
        print(f"{name:16} {spec.level:5} {spec.description} — {where}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
            "explain": cmd_explain, "datasets": cmd_datasets}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line (``--debug`` for the traceback) and return non-zero."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        return COMMANDS[args.command](args)
    except NeurallmError as exc:
        if args.debug:
            raise
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
