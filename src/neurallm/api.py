"""The Python API: the same operations as the CLI, as functions.

::

    import neurallm
    result = neurallm.train("tinyshakespeare", "runs/shakespeare", level="char", epochs=1, max_time=60)
    run = neurallm.load_run("runs/shakespeare")
    print(run.evaluate(split="test").ppl)
    print(run.generate(prompt="ROMEO:", tokens=200, seed=1).text)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from neurallm.config import ModelConfig, RunConfig, TrainConfig
from neurallm.data.sources import SourceSettings
from neurallm.data.stream import PreparedCorpus, VocabSettings, is_prepared, load_prepared, prepare_corpus
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError, DataError
from neurallm.evaluation import EvalResult, compare_batch_sizes, evaluate, evaluate_naive
from neurallm.generation import GenerationResult, generate
from neurallm.models import build_model
from neurallm.runtime import keep_freed_memory, log_line, pick_device
from neurallm.training import checkpoint as ckpt
from neurallm.training.loop import Trainer, TrainResult


def _split_kwargs(cls, kwargs: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def prepare(data: str | Path, out: str | Path | None = None, *, log=log_line, **settings) -> PreparedCorpus:
    """Tokenize a corpus and write its id streams (see :func:`neurallm.data.stream.prepare_corpus`).

    Args:
        data: folder, file or registered dataset name.
        out: folder to write; default a cache folder keyed by the data and settings.
        **settings: fields of ``SourceSettings`` (format, text_column, text_field, split_ratios, encoding),
            ``TokenizerSettings`` (level, lowercase, strip_punctuation) and ``VocabSettings`` (min_freq, max_vocab).
    """
    settings = dict(settings)
    source = SourceSettings(data=str(data), **_split_kwargs(SourceSettings, settings))
    tokenizer = TokenizerSettings(**_split_kwargs(TokenizerSettings, settings))
    vocab = VocabSettings(**_split_kwargs(VocabSettings, settings))
    if settings:
        raise ConfigError(f"unknown setting(s) for prepare: {', '.join(sorted(settings))}")
    return prepare_corpus(source, tokenizer, vocab, out_dir=Path(out) if out else None, log=log)


def open_training_data(data: str | Path, settings: dict, log=log_line) -> tuple[PreparedCorpus, SourceSettings, TokenizerSettings, VocabSettings]:
    """The prepared corpus for ``data``: a prepared folder as it is, anything else prepared (or reused from cache)."""
    if Path(data).is_dir() and is_prepared(Path(data)):
        prepared = load_prepared(Path(data))
        given = {k for k in settings if k in {f.name for f in fields(TokenizerSettings)} | {f.name for f in fields(SourceSettings)}}
        if given:
            raise ConfigError(f"--data {data} is already prepared; its tokenizer and reading settings are fixed, so drop "
                              + ", ".join("--" + k.replace("_", "-") for k in sorted(given)))
        meta = prepared.meta
        source = SourceSettings(**{**meta["source"], "split_ratios": tuple(meta["source"]["split_ratios"])})
        return prepared, source, prepared.tokenizer, VocabSettings(**meta["vocab_settings"])
    settings = dict(settings)
    source = SourceSettings(data=_data_name(data), **_split_kwargs(SourceSettings, settings))
    tokenizer = TokenizerSettings(**_split_kwargs(TokenizerSettings, settings))
    vocab = VocabSettings(**_split_kwargs(VocabSettings, settings))
    return prepare_corpus(source, tokenizer, vocab, log=log), source, tokenizer, vocab


def _data_name(data: str | Path) -> str:
    """A path as an absolute path (so the run can be evaluated from any folder); a dataset name as it is."""
    return str(Path(data).resolve()) if Path(data).exists() else str(data)


_SETTING_NAMES = {f.name for cls in (SourceSettings, TokenizerSettings, VocabSettings, ModelConfig, TrainConfig)
                  for f in fields(cls)} - {"data", "vocab_size"}


def _reject_unknown(settings: dict) -> None:
    unknown = sorted(set(settings) - _SETTING_NAMES)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_SETTING_NAMES))}")


def train(data: str | Path, out: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool | None = None, log=log_line, save_every: float = 300.0, **settings) -> TrainResult:
    """Train a model on ``data`` into the run directory ``out``.

    ``settings`` are the fields of ``ModelConfig`` (model, emsize, nhid, nlayers, dropout, tied, nhead, memory),
    ``TrainConfig`` (lr, clip, epochs, batch_size, bptt, seed, optimizer, max_time, device, shuffle_windows, …)
    and of the data settings accepted by :func:`prepare`. With ``resume=True`` the run continues from
    ``last.safetensors``; only ``epochs`` and ``max_time`` may differ from the saved configuration.

    Like the CLI, it asks glibc to keep freed memory for reuse (:func:`neurallm.runtime.keep_freed_memory`),
    which nearly doubles CPU training speed; the process keeps that memory until it exits.
    """
    keep_freed_memory()
    out = Path(out)
    settings = dict(settings)
    _reject_unknown(settings)
    if not save_every >= 0:  # NaN fails this too
        raise ConfigError(f"--save-every must be 0 (every step) or more seconds (inf: only at the end of epochs), got {save_every}")
    if resume:
        return _resume(out, data, settings, progress=progress, log=log, save_every=save_every)
    model_settings = _split_kwargs(ModelConfig, settings)
    train_settings = _split_kwargs(TrainConfig, settings)
    train_config = TrainConfig(**train_settings)
    ModelConfig(**{**model_settings, "vocab_size": 2})  # check model flags before the data is read
    pick_device(train_config.device)  # and the device: `--device cuda` on a CPU machine fails before any work
    ckpt.check_new_run_dir(out, force)
    prepared, source, tokenizer, vocab_settings = open_training_data(data, settings, log)
    model_config = ModelConfig(**{**model_settings, "vocab_size": len(prepared.vocab)})
    config = RunConfig(source, tokenizer, vocab_settings, model_config, train_config)
    # Build the trainer (which checks batch size and bptt against the data) before config.json marks --out as a
    # run: a setting that fails here must leave no half-made run that blocks the corrected command.
    trainer = Trainer(out, config, prepared, progress=progress, log=log, save_every=save_every)
    # Only now may --force delete the old run: the new one is ready to start. The folder stays locked until the
    # run ends, so a second process (another --force, a --resume) is refused rather than mixed in.
    with ckpt.claim_new_run_dir(out, force):
        ckpt.write_run_files(out, config, prepared.vocab)
        log(f"{config.model.model}: {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
            f"vocabulary {len(prepared.vocab):,}, {len(prepared.ids('train')):,} training tokens, device {trainer.device}")
        return trainer.run()


# Settings a resumed run may change: it can be extended, nothing else.
RESUME_MUTABLE = {"epochs", "max_time"}


def _resume(out: Path, data, settings: dict, *, progress, log, save_every) -> TrainResult:
    ckpt.read_run_config(out)  # a run, before a lock file is put in it
    with ckpt.lock_run_dir(out):
        # read again under the lock: the run may have changed while we waited for it
        return _resume_locked(out, ckpt.read_run_config(out), data, settings, progress=progress, log=log, save_every=save_every)


def _no_last_checkpoint(out: Path) -> ckpt.RunDirError:
    """Say what is left of a run without last.safetensors, and never advise deleting the only trained weights."""
    if (out / ckpt.BEST_FILE).is_file():
        return ckpt.RunDirError(
            f"{out} has no {ckpt.LAST_FILE}, so it cannot be resumed; its best weights, {out / ckpt.BEST_FILE}, are "
            "still there (eval and generate use them). To keep them, train the new run into another --out "
            "(or copy the folder first): --force would delete them"
        )
    return ckpt.RunDirError(f"{out} has no {ckpt.LAST_FILE} and no {ckpt.BEST_FILE}: it stopped before its first checkpoint, "
                            f"so there is nothing to resume or keep; start it again with `neurallm train --out {out} --force ...`")


def _resume_locked(out: Path, config: RunConfig, data, settings: dict, *, progress, log, save_every) -> TrainResult:
    if not (out / ckpt.LAST_FILE).is_file():
        raise _no_last_checkpoint(out)
    saved = {**config.source.to_dict(), **config.tokenizer.to_dict(), **config.vocab.__dict__,
             **config.model.to_dict(), **config.train.to_dict()}
    for key, value in settings.items():
        if key not in saved:
            raise ConfigError(f"unknown setting {key}")
        if key in RESUME_MUTABLE:
            continue
        if isinstance(saved[key], tuple):
            value = tuple(value)
        if value != saved[key]:
            flag = "--context" if key == "eval_context" else f"--{key.replace('_', '-')}"
            raise ConfigError(
                f"{flag} {value} differs from the run's {saved[key]}; --resume continues a run with "
                "its own settings (only --epochs and --max-time may change): drop the flag or start a new --out"
            )
    if data is not None and _data_name(data) != config.source.data:
        raise ConfigError(f"--data {data} differs from the run's {config.source.data}; resume with the same data")
    for key in RESUME_MUTABLE & settings.keys():
        setattr(config.train, key, settings[key])
    config.train.__post_init__()
    ckpt.check_weights_fit(out / ckpt.LAST_FILE, config.model)  # before the Trainer builds the model config.json describes
    if Path(config.source.data).is_dir() and is_prepared(Path(config.source.data)):
        prepared = load_prepared(Path(config.source.data))
    else:
        prepared = prepare_corpus(config.source, config.tokenizer, config.vocab, log=log)
    ckpt.write_run_files(out, config, prepared.vocab)
    trainer = Trainer(out, config, prepared, progress=progress, log=log, save_every=save_every)
    return trainer.run(resume=True)


@dataclass
class Run:
    """A trained model loaded from its run directory, ready to evaluate and sample.

    Attributes:
        folder: the run directory.
        config: its settings.
        vocab: its vocabulary.
        model: the model (eval mode) with the chosen checkpoint's weights.
    """

    folder: Path
    config: RunConfig
    vocab: Vocab
    model: nn.Module

    @property
    def level(self) -> str:
        return self.config.tokenizer.level

    def eval_data(self, data: str | Path | None = None, **source_settings) -> PreparedCorpus:
        """A corpus encoded with this run's tokenizer and vocabulary (default: the run's own data)."""
        if data is not None and Path(data).is_dir() and is_prepared(Path(data)):
            prepared = load_prepared(Path(data))
            if prepared.tokenizer != self.config.tokenizer or prepared.vocab.tokens != self.vocab.tokens:
                raise DataError(
                    f"--data {data} was prepared with another tokenization or vocabulary ({prepared.tokenizer}) than the run "
                    f"{self.folder} ({self.config.tokenizer}); pass the raw text instead so it is encoded the run's way"
                )
            return prepared
        base = self.config.source.to_dict()
        if data is not None:
            base["data"] = str(data)
        source = SourceSettings(**{**base, **{k: v for k, v in source_settings.items() if v is not None}})
        return prepare_corpus(source, self.config.tokenizer, vocab=self.vocab, log=lambda message: None)

    def evaluate(self, data: str | Path | None = None, *, split: str = "test", batch_size: int = 10,
                 context: int | None = None, naive: bool = False, **source_settings) -> EvalResult:
        """Loss, perplexity and tokens scored on a split (exact method unless ``naive``)."""
        ids = self.eval_data(data, **source_settings).ids(split)
        bptt = self.config.train.bptt
        if naive:
            return evaluate_naive(self.model, ids, batch_size=batch_size, bptt=bptt)
        return evaluate(self.model, ids, batch_size=batch_size, bptt=bptt, context=context)

    def compare_batch_sizes(self, batch_sizes: list[int], data: str | Path | None = None, *, split: str = "test",
                            context: int | None = None, **source_settings) -> list[dict]:
        ids = self.eval_data(data, **source_settings).ids(split)
        return compare_batch_sizes(self.model, ids, batch_sizes, bptt=self.config.train.bptt, context=context)

    def generate(self, prompt: str = "", *, tokens: int = 1000, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 1111, context: int | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Sample text after ``prompt`` (same seed, same text); ``on_text`` receives the text as it is made."""
        train = self.config.train
        context = context if context is not None else train.bptt + self.config.model.memory
        return generate(self.model, self.vocab, self.config.tokenizer, prompt=prompt, tokens=tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, context=context, on_text=on_text)


def load_run(run_dir: str | Path, *, checkpoint: str = "best", device: str = "auto") -> Run:
    """Load a run directory's model (``best``: model.safetensors, ``last``: last.safetensors)."""
    folder = Path(run_dir)
    config = ckpt.read_run_config(folder)
    vocab = ckpt.read_vocab(folder)
    if len(vocab) != config.model.vocab_size:
        raise ckpt.RunDirError(f"{folder}: vocab.json has {len(vocab)} tokens but config.json says {config.model.vocab_size}; the run directory is inconsistent")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {checkpoint!r}")
    path = folder / (ckpt.BEST_FILE if checkpoint == "best" else ckpt.LAST_FILE)
    ckpt.check_weights_fit(path, config.model)  # header against config before a byte of the model is allocated
    model = build_model(config.model)
    tensors, _ = ckpt.read_safetensors(path)
    ckpt.load_model_tensors(model, tensors, path)
    model.to(pick_device(device)).eval()
    return Run(folder, config, vocab, model)
