"""The Python API: the same operations as the CLI, as functions.

::

    import neurallm
    result = neurallm.train("tinyshakespeare", "runs/shakespeare", level="char", epochs=1, max_time=60)
    run = neurallm.load_run("runs/shakespeare")
    print(run.evaluate(split="test").ppl)
    print(run.generate(prompt="ROMEO:", tokens=200, seed=1).text)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from neurallm.config import DATA_SETTINGS, EVAL_AMP, EVAL_BATCH_SIZE, TRAIN_SETTINGS, ModelConfig, RunConfig, TrainConfig
from neurallm.data.prepare import prepare  # noqa: F401  (part of this API; lives apart so that it needs no torch)
from neurallm.data.sources import SPLITS, SourceSettings, dataset_location
from neurallm.data.stream import PreparedCorpus, VocabSettings, cached_corpus, is_prepared, load_prepared, prepare_corpus
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.distributed import Ranks, ranks_from_environment, shutdown
from neurallm.errors import ConfigError, DataError
from neurallm.evaluation import EvalResult, compare_batch_sizes, evaluate, evaluate_naive, with_text_units
from neurallm.evaluation_methods.cache_pointer import CachePointerSettings, evaluate_cache_pointer
from neurallm.evaluation_methods.dynamic_eval import DynamicSettings, evaluate_dynamic
from neurallm.generation import GenerationResult, generate
from neurallm.models import build_model, count_parameters
from neurallm.runtime import amp_dtype_for, pick_device
from neurallm.scoring import TextScore, score_texts
from neurallm.settings import settings_of, split_settings
from neurallm.training import checkpoint as ckpt
from neurallm.training.loop import Trainer, TrainResult

logger = logging.getLogger(__name__)


def open_training_data(data: str | Path, settings: dict) -> tuple[PreparedCorpus, SourceSettings, TokenizerSettings, VocabSettings]:
    """The prepared corpus for ``data``: a prepared folder as it is, anything else prepared (or reused from cache)."""
    if Path(data).is_dir() and is_prepared(Path(data)):
        prepared = load_prepared(Path(data))
        fixed = {s.name: s.flag for s in settings_of(TokenizerSettings, SourceSettings)}
        given = sorted(fixed[k] for k in settings if k in fixed)
        if given:
            raise ConfigError(f"--data {data} is already prepared; its tokenizer and reading settings are fixed, so drop "
                              + ", ".join(given))
        meta = prepared.meta
        source = SourceSettings(**{**meta["source"], "split_ratios": tuple(meta["source"]["split_ratios"])})
        return prepared, source, prepared.tokenizer, VocabSettings(**meta["vocab_settings"])
    source, tokenizer, vocab = split_settings(settings, *DATA_SETTINGS, what="the data")
    source = SourceSettings(data=_data_name(data), **source)
    tokenizer, vocab = TokenizerSettings(**tokenizer), VocabSettings(**vocab)
    prepared = prepare_corpus(source, tokenizer, vocab)
    if not Path(source.data).exists():  # a dataset name: record where it was found, for eval from any folder
        location = dataset_location(source)
        source = replace(source, location=None if location is None else str(location))
    return prepared, source, tokenizer, vocab


def _data_name(data: str | Path) -> str:
    """A path as an absolute path (so the run can be evaluated from any folder); a dataset name as it is."""
    return str(Path(data).resolve()) if Path(data).exists() else str(data)


def train(data: str | Path, out: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool | None = None, save_every: float = 300.0, **settings) -> TrainResult:
    """Train a model on ``data`` into the run directory ``out``.

    ``settings`` are the fields of ``ModelConfig`` (model, emsize, nhid, nlayers, dropout, tied, nhead, memory),
    ``TrainConfig`` (lr, clip, epochs, batch_size, bptt, seed, optimizer, max_time, device, shuffle_windows, …)
    and of the data settings accepted by :func:`prepare`: the flags of ``neurallm train --help`` with ``_`` for
    ``-`` (``eval_context`` is ``--context``). With ``resume=True`` the run continues from ``last.safetensors``;
    only the settings declared resumable (``epochs``, ``max_time``) may differ from the saved configuration.

    Progress lines go to the ``neurallm`` logger (:mod:`logging`; the CLI prints them). Unlike the CLI, this
    function leaves the process's memory allocator alone: call :func:`neurallm.keep_freed_memory` once first for
    the CLI's CPU training speed (nearly twice as fast), at the cost of the process keeping freed memory.
    """
    out = Path(out)
    *data_settings, model_settings, train_settings = split_settings(settings, *TRAIN_SETTINGS, what="train")
    if not save_every >= 0:  # NaN fails this too
        raise ConfigError(f"--save-every must be 0 (every step) or more seconds (inf: only at the end of epochs), got {save_every}")
    if resume:
        return _resume(out, data, settings, progress=progress, save_every=save_every)
    data_settings = {k: v for section in data_settings for k, v in section.items()}
    train_config = TrainConfig(**train_settings)
    ModelConfig(**{**model_settings, "vocab_size": 2})  # check model flags before the data is read
    device = pick_device(train_config.device)  # and the device: `--device cuda` on a CPU machine fails before any work
    amp_dtype_for(train_config.amp, device)  # and --amp bf16 where the hardware has no bfloat16
    ranks, _ = ranks_from_environment(device)  # under torchrun: join the other processes (only rank 0 logs)
    trainer = None
    try:
        def check_out_and_prepare():
            if ranks.is_main:  # only rank 0 looks at, and later replaces, --out
                ckpt.check_new_run_dir(out, force)
            return open_training_data(data, data_settings)

        # rank 0 prepares the data; the others then find it in the cache
        prepared, source, tokenizer, vocab_settings = ranks.main_first(check_out_and_prepare)
        model_config = ModelConfig(**{**model_settings, "vocab_size": len(prepared.vocab)})
        config = RunConfig(source, tokenizer, vocab_settings, model_config, train_config)
        # Build the trainer (which checks batch size and bptt against the data) before config.json marks --out as a
        # run: a setting that fails here must leave no half-made run that blocks the corrected command.
        trainer = Trainer(out, config, prepared, progress=progress, save_every=save_every, ranks=ranks)
        with ExitStack() as held:
            def claim_out():
                # Only now may --force delete the old run: the new one is ready to start. The folder stays locked
                # until the run ends, so a second process (another --force, a --resume) is refused rather than mixed in.
                if ranks.is_main:
                    held.enter_context(ckpt.claim_new_run_dir(out, force))
                    ckpt.write_run_files(out, config, prepared.vocab)

            ranks.main_first(claim_out)  # a refusal on rank 0 stops every rank
            logger.info(f"{config.model.model}: {count_parameters(trainer.model):,} parameters, "
                        f"vocabulary {len(prepared.vocab):,}, {len(prepared.ids('train')):,} training tokens, device {trainer.device}"
                        + _processes_note(ranks))
            return trainer.run()
    finally:
        _leave(ranks, trainer)


def _leave(ranks: Ranks, trainer: Trainer | None) -> None:
    """Release the trainer's DDP wrapper, then the process group (in that order: see Trainer.close)."""
    if trainer is not None:
        trainer.close()
    shutdown(ranks)


def _processes_note(ranks: Ranks) -> str:
    return f", {ranks.world_size} processes (DistributedDataParallel)" if ranks.distributed else ""


def _resume(out: Path, data, settings: dict, *, progress, save_every) -> TrainResult:
    config = ckpt.read_run_config(out)  # a run, before a lock file is put in it
    ranks, _ = ranks_from_environment(pick_device(config.resumed_with(settings).train.device))  # --device may change
    trainer = None
    try:
        with ExitStack() as held:
            def lock_and_read():
                if ranks.is_main:  # one lock for the run: rank 0 holds it for all processes
                    held.enter_context(ckpt.lock_run_dir(out))
                # read again under the lock: the run may have changed while we waited for it
                return ckpt.read_run_config(out)

            config = ranks.main_first(lock_and_read)
            # every rank runs the same checks on the same files, so they all take the same branch
            trainer = _resumed_trainer(out, config, data, settings, ranks, progress=progress, save_every=save_every)
            return trainer.run(resume=True)
    finally:
        _leave(ranks, trainer)


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


def _resumed_trainer(out: Path, config: RunConfig, data, settings: dict, ranks: Ranks, *, progress, save_every) -> Trainer:
    """The trainer of a locked run to resume, after checking that it can be resumed with ``settings`` and ``data``."""
    if not (out / ckpt.LAST_FILE).is_file():
        raise _no_last_checkpoint(out)
    config = config.resumed_with(settings)
    if data is not None and _data_name(data) != config.source.data:
        raise ConfigError(f"--data {data} differs from the run's {config.source.data}; resume with the same data")
    ckpt.check_weights_fit(out / ckpt.LAST_FILE, config.model)  # before the Trainer builds the model config.json describes

    def prepare():
        if Path(config.source.data).is_dir() and is_prepared(Path(config.source.data)):
            return load_prepared(Path(config.source.data))
        return prepare_corpus(config.source, config.tokenizer, config.vocab)

    prepared = ranks.main_first(prepare)
    if ranks.is_main:
        ckpt.write_run_files(out, config, prepared.vocab)
    return Trainer(out, config, prepared, progress=progress, save_every=save_every, ranks=ranks)


# Above this share of <unk> tokens `eval` warns: predicting <unk> is easy (one token stands for every unknown word),
# so a corpus half made of words the run never saw scores a deceptively *low* perplexity. A run's own WikiText
# test split has 0% (its rare words are already <unk> in the text, and in the vocabulary).
UNK_WARN_SHARE = 0.05


def unk_share(corpus: PreparedCorpus, split: str) -> float:
    """Fraction of ``split``'s tokens that were not in the vocabulary when it was encoded."""
    counts = corpus.meta["splits"][split]
    return counts["unk"] / max(1, counts["tokens"])


def warn_if_many_unknown(share: float, what: str) -> None:
    """Log a warning when more than :data:`UNK_WARN_SHARE` of ``what`` (tokens, named) became ``<unk>``."""
    if share > UNK_WARN_SHARE:
        logger.warning(
            f"warning: {share:.1%} of the {what} are not in the run's vocabulary and were scored as <unk>, "
            "which makes perplexity look better than it is; compare perplexities only at similar <unk> shares"
        )


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

    def eval_data(self, data: str | Path | None = None, *, splits: tuple[str, ...] = SPLITS, **source_settings) -> PreparedCorpus:
        """A corpus encoded with this run's tokenizer and vocabulary (default: the run's own data).

        The run's own data is read from the folder training prepared, when it is still in the cache; any other text
        is encoded for the given ``splits`` only.
        """
        if data is not None and Path(data).is_dir() and is_prepared(Path(data)):
            prepared = load_prepared(Path(data))
            if prepared.tokenizer != self.config.tokenizer or prepared.vocab.tokens != self.vocab.tokens:
                raise DataError(
                    f"--data {data} was prepared with another tokenization or vocabulary ({prepared.tokenizer}) than the run "
                    f"{self.folder} ({self.config.tokenizer}); pass the raw text instead so it is encoded the run's way"
                )
            return prepared
        overrides = {k: v for k, v in source_settings.items() if v is not None}
        if (data is None or _data_name(data) == self.config.source.data) and not overrides:
            own = cached_corpus(self.config.source, self.config.tokenizer, self.config.vocab)
            if own is not None and own.vocab.tokens == self.vocab.tokens:
                return own
        base = self.config.source.to_dict()
        if data is not None:
            base["data"], base["location"] = str(data), None
        source = SourceSettings(**{**base, **overrides})
        return prepare_corpus(source, self.config.tokenizer, vocab=self.vocab, splits=splits)

    def evaluate(self, data: str | Path | None = None, *, split: str = "test", batch_size: int = EVAL_BATCH_SIZE,
                 context: int | None = None, naive: bool = False, cache_pointer: CachePointerSettings | None = None,
                 dynamic: DynamicSettings | None = None, amp: str = EVAL_AMP, **source_settings) -> EvalResult:
        """Loss, perplexity and tokens scored on a split (exact method unless ``naive``; with a cache pointer or
        dynamic evaluation when their settings are given), with the share of its tokens that became ``<unk>`` (a
        warning is logged above :data:`UNK_WARN_SHARE`). ``amp`` is ``--amp``: ``bf16`` runs exact evaluation's
        products in bfloat16, ``auto`` where the hardware has it (the other methods stay float32)."""
        amp_dtype = amp_dtype_for(amp, next(self.model.parameters()).device)
        if amp == "bf16" and (naive or cache_pointer is not None or dynamic is not None):
            raise ConfigError("--amp bf16 applies to exact evaluation only; drop it with --naive, --cache-pointer or --dynamic")
        corpus = self.eval_data(data, splits=(split,), **source_settings)
        ids = corpus.ids(split)
        bptt = self.config.train.bptt
        if cache_pointer is not None:
            result = evaluate_cache_pointer(self.model, ids, cache_pointer, batch_size=batch_size, bptt=bptt, context=context)
        elif dynamic is not None:
            result = evaluate_dynamic(self.model, ids, dynamic)
        elif naive:
            result = evaluate_naive(self.model, ids, batch_size=batch_size, bptt=bptt)
        else:
            result = evaluate(self.model, ids, batch_size=batch_size, bptt=bptt, context=context, amp_dtype=amp_dtype)
        result.unk_share = unk_share(corpus, split)
        with_text_units(result, corpus.meta["splits"][split])
        warn_if_many_unknown(result.unk_share, f"{split} tokens of {corpus.meta.get('source', {}).get('data', data)}")
        return result

    def score(self, texts: list[str], *, independent: bool = False, context: int | None = None) -> list[TextScore]:
        """Log-probability of each text, line by line, by exact evaluation's rules (:mod:`neurallm.scoring`).

        Each text is one document whose lines are read with the lines before them as context (``independent``:
        each line alone). A warning is logged when more than :data:`UNK_WARN_SHARE` of the tokens are ``<unk>``.
        """
        if isinstance(texts, str):
            raise ConfigError("Run.score takes a list of texts; wrap a single text as [text]")
        scores = score_texts(self.model, self.vocab, self.config.tokenizer, list(texts), independent=independent,
                             bptt=self.config.train.bptt, context=context)
        tokens = sum(len(score.tokens) for score in scores)
        warn_if_many_unknown(sum(score.unknown for score in scores) / max(1, tokens), "scored tokens")
        return scores

    def compare_batch_sizes(self, batch_sizes: list[int], data: str | Path | None = None, *, split: str = "test",
                            context: int | None = None, **source_settings) -> list[dict]:
        ids = self.eval_data(data, splits=(split,), **source_settings).ids(split)
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
    """Load a run directory's model (``best``: model.safetensors, ``last``: last.safetensors).

    An NT-ASGD run that has begun averaging is scored, like its validation, with the averaged weights: ``last``
    then loads the running average saved beside the raw weights."""
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
    if checkpoint == "last":
        _apply_saved_average(model, tensors, path)
    model.to(pick_device(device)).eval()
    return Run(folder, config, vocab, model)


def _apply_saved_average(model: nn.Module, tensors: dict, path: Path) -> None:
    from neurallm.training.ntasgd import PREFIX

    averages = {name[len(PREFIX):]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    if not averages:
        return
    params = dict(model.named_parameters())
    if set(averages) != set(params) or any(averages[n].shape != p.shape for n, p in params.items()):
        raise ckpt.RunDirError(f"{path}: its NT-ASGD averages do not match the model's parameters; the file is damaged")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(averages[name])
