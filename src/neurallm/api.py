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
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from neurallm.config import EvalConfig, EvalMethods, LoadSettings, ModelConfig, ScoreConfig, TrainConfig
from neurallm.data.prepare import prepare  # noqa: F401  (part of this API; lives apart so that it needs no torch)
from neurallm.data.sources import SPLITS, SourceSettings, dataset_location
# UNK_WARN_SHARE: named in this module's docstrings, and importable from here as before
from neurallm.data.trust import UNK_WARN_SHARE, log_corpus_warnings, small_split_warning, unk_shares, unk_target_share, unk_warning
from neurallm.data.stream import PreparedCorpus, VocabSettings, cached_corpus, is_prepared, load_prepared, prepare_corpus
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.distributed import Ranks, as_peer_lost, ranks_from_environment, shutdown
from neurallm.elastic import (
    DEFAULT_DDP_TIMEOUT, check_ddp_timeout, launch_record, restart_count, restart_plan, restarts_allowed, write_launch_record,
)
from neurallm.errors import ConfigError, DataError
from neurallm.evaluation import EvalResult, compare_batch_sizes, evaluate, evaluate_naive, with_text_units
from neurallm.evaluation_methods.cache_pointer import CachePointerSettings, evaluate_cache_pointer
from neurallm.evaluation_methods.dynamic_eval import DynamicSettings, evaluate_dynamic, gradient_rms
from neurallm.generation import GenerationResult, generate, sampling_settings
from neurallm.models import build_model, count_parameters
from neurallm.run_config import DATA_SETTINGS, TRAIN_SETTINGS, RunConfig
from neurallm.runtime import amp_dtype_for, pick_device, precision_name
from neurallm.sampling import SamplingSettings, generation_context
from neurallm.scoring import TextScore, score_texts
from neurallm.settings import settings_of, split_settings
from neurallm import runfolder, weights
from neurallm.errors import RunDirError

if TYPE_CHECKING:  # training is imported by train() alone: loading and using a run never imports it
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
          progress: bool | None = None, save_every: float = 300.0, ddp_timeout: float = DEFAULT_DDP_TIMEOUT,
          **settings) -> TrainResult:
    """Train a model on ``data`` into the run directory ``out``.

    ``settings`` are the fields of ``ModelConfig`` (model, emsize, nhid, nlayers, dropout, tied, nhead, memory),
    ``TrainConfig`` (lr, clip, epochs, batch_size, bptt, seed, optimizer, max_time, device, shuffle_windows, …)
    and of the data settings accepted by :func:`prepare`: the flags of ``neurallm train --help`` with ``_`` for
    ``-`` (``eval_context`` is ``--context``). With ``resume=True`` the run continues from ``last.safetensors``;
    only the settings declared resumable (``epochs``, ``max_time``) may differ from the saved configuration.

    Under torchrun, ``ddp_timeout`` is how many seconds a process waits for the others before it stops with one
    line (a stalled peer; a dead one is reported at once); a group that ``torchrun --max-restarts N`` restarts
    resumes the run it started from its last checkpoint without ``resume`` (:mod:`neurallm.elastic`).

    Progress lines go to the ``neurallm`` logger (:mod:`logging`; the CLI prints them). The global random
    generators (Python, NumPy, torch) are seeded for the run and given back as they were. Unlike the CLI, this
    function leaves the process's memory allocator alone: call :func:`neurallm.keep_freed_memory` once first for
    the CLI's CPU training speed (nearly twice as fast), at the cost of the process keeping freed memory.
    """
    from neurallm.training.loop import Trainer

    out = Path(out)
    *data_settings, model_settings, train_settings = split_settings(settings, *TRAIN_SETTINGS, what="train")
    if not save_every >= 0:  # NaN fails this too
        raise ConfigError(f"--save-every must be 0 (every step) or more seconds (inf: only at the end of epochs), got {save_every}")
    check_ddp_timeout(ddp_timeout)
    if resume:
        return _resume(out, data, settings, progress=progress, save_every=save_every, ddp_timeout=ddp_timeout)
    data_settings = {k: v for section in data_settings for k, v in section.items()}
    train_config = TrainConfig(**train_settings)
    ModelConfig(**{**model_settings, "vocab_size": 2})  # check model flags before the data is read
    device = pick_device(train_config.device)  # and the device: `--device cuda` on a CPU machine fails before any work
    amp_dtype_for(train_config.amp, device)  # and --amp bf16 where the hardware has no bfloat16
    ranks, _ = ranks_from_environment(device, ddp_timeout)  # under torchrun: join the other processes (only rank 0 logs)
    trainer = None
    try:
        launch = launch_record(data, out, settings)
        plan = _restart_plan(ranks, out, launch)
        if plan == "resume":
            logger.info(f"torchrun restarted the processes: {out} was started by this command; resuming it")
            # data=None: the launch record already proves it is the run's data (which may be a prepared folder)
            return _resume(out, None, settings, progress=progress, save_every=save_every, ddp_timeout=ddp_timeout)
        force = force or plan == "restart"  # this command's own folder, killed before its first checkpoint

        def check_out_and_prepare():
            if ranks.is_main:  # only rank 0 looks at, and later replaces, --out
                runfolder.check_new_run_dir(out, force)
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
                    held.enter_context(runfolder.claim_new_run_dir(out, force))
                    runfolder.write_run_files(out, config, prepared.vocab)
                    if restarts_allowed():  # what a restarted attempt checks before it resumes the folder
                        write_launch_record(out, launch)

            ranks.main_first(claim_out)  # a refusal on rank 0 stops every rank
            if ranks.is_main:  # once the run starts (a refused command says its one line alone)
                log_corpus_warnings(prepared.meta, logger)  # splits too small, or mostly <unk>, to trust
            logger.info(f"{config.model.model}: {count_parameters(trainer.model):,} parameters, "
                        f"vocabulary {len(prepared.vocab):,}, {len(prepared.ids('train')):,} training tokens, device {trainer.device}, "
                        f"products in {precision_name(trainer.amp_dtype)} (--amp {config.train.amp})" + _processes_note(ranks))
            return trainer.run()
    except Exception as exc:
        raise as_peer_lost(exc, ranks, ddp_timeout, out)  # a peer that died or stalled: one line, not gloo's traceback
    finally:
        _leave(ranks, trainer)


def _restart_plan(ranks: Ranks, out: Path, launch: dict[str, str]) -> str:
    """``fresh`` on a first attempt; after a torchrun restart (seen on any rank), rank 0's :func:`restart_plan`."""
    [restarted] = ranks.any([restart_count() > 0])  # a node restarted for another node's failure counts 0
    if not restarted:
        return "fresh"
    return ranks.from_main(restart_plan(out, launch, runfolder.LAST_FILE) if ranks.is_main else None)


def _leave(ranks: Ranks, trainer: Trainer | None) -> None:
    """Release the trainer's DDP wrapper, then the process group (in that order: see Trainer.close)."""
    if trainer is not None:
        trainer.close()
    shutdown(ranks)


def _processes_note(ranks: Ranks) -> str:
    return f", {ranks.world_size} processes (DistributedDataParallel)" if ranks.distributed else ""


def _resume(out: Path, data, settings: dict, *, progress, save_every, ddp_timeout: float) -> TrainResult:
    config = runfolder.read_run_config(out)  # a run, before a lock file is put in it
    device = pick_device(config.resumed_with(settings).train.device)  # --device may change
    ranks, _ = ranks_from_environment(device, ddp_timeout)
    trainer = None
    try:
        with ExitStack() as held:
            def lock_and_read():
                if ranks.is_main:  # one lock for the run: rank 0 holds it for all processes
                    held.enter_context(runfolder.lock_run_dir(out))
                # read again under the lock: the run may have changed while we waited for it
                return runfolder.read_run_config(out)

            config = ranks.main_first(lock_and_read)
            # every rank runs the same checks on the same files, so they all take the same branch
            trainer = _resumed_trainer(out, config, data, settings, ranks, progress=progress, save_every=save_every)
            return trainer.run(resume=True)
    except Exception as exc:
        raise as_peer_lost(exc, ranks, ddp_timeout, out)
    finally:
        _leave(ranks, trainer)


def _no_last_checkpoint(out: Path) -> RunDirError:
    """Say what is left of a run without last.safetensors, and never advise deleting the only trained weights."""
    if (out / runfolder.BEST_FILE).is_file():
        return RunDirError(
            f"{out} has no {runfolder.LAST_FILE}, so it cannot be resumed; its best weights, {out / runfolder.BEST_FILE}, are "
            "still there (eval and generate use them). To keep them, train the new run into another --out "
            "(or copy the folder first): --force would delete them"
        )
    return RunDirError(f"{out} has no {runfolder.LAST_FILE} and no {runfolder.BEST_FILE}: it stopped before its first checkpoint, "
                            f"so there is nothing to resume or keep; start it again with `neurallm train --out {out} --force ...`")


def _resumed_trainer(out: Path, config: RunConfig, data, settings: dict, ranks: Ranks, *, progress, save_every) -> Trainer:
    """The trainer of a locked run to resume, after checking that it can be resumed with ``settings`` and ``data``."""
    from neurallm.training.checkpoint import check_last
    from neurallm.training.loop import Trainer

    if not (out / runfolder.LAST_FILE).is_file():
        raise _no_last_checkpoint(out)
    config = config.resumed_with(settings)
    if data is not None and _data_name(data) != config.source.data:
        raise ConfigError(f"--data {data} differs from the run's {config.source.data}; resume with the same data")
    weights.check_weights_fit(out / runfolder.LAST_FILE, config.model)  # before the Trainer builds the model config.json describes
    check_last(out / runfolder.LAST_FILE)  # and the training state, before anything is written or trained

    def prepare():
        if Path(config.source.data).is_dir() and is_prepared(Path(config.source.data)):
            return load_prepared(Path(config.source.data))
        return prepare_corpus(config.source, config.tokenizer, config.vocab)

    prepared = ranks.main_first(prepare)
    if ranks.is_main:
        runfolder.write_run_files(out, config, prepared.vocab)
    return Trainer(out, config, prepared, progress=progress, save_every=save_every, ranks=ranks)


def unk_share(corpus: PreparedCorpus, split: str) -> float:
    """Share of ``split``'s targets that are ``<unk>``, whatever their origin (see :mod:`neurallm.data.trust`)."""
    return unk_target_share(corpus.meta["splits"][split])


def warn_if_many_unknown(share: float, what: str, replaced: float | None = None) -> None:
    """Log a warning when more than :data:`UNK_WARN_SHARE` of ``what`` (tokens, named) are ``<unk>``."""
    warning = unk_warning(share, what, replaced)
    if warning is not None:
        logger.warning(warning)


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
    # dynamic evaluation's gradient RMS per window length: one pass over the training text (40 s for cpu-fast) that
    # a grid of --dynamic-lr values on this Run's weights would otherwise repeat for every value
    _gradient_rms: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def evaluate(self, data: str | Path | None = None, **settings) -> EvalResult:
        """Loss, perplexity and tokens scored on a split (exact method unless ``naive``; with a cache pointer or
        dynamic evaluation when their settings are given), with the share of its tokens that became ``<unk>`` (a
        warning is logged above :data:`UNK_WARN_SHARE`).

        ``settings`` are the fields of :class:`~neurallm.config.EvalConfig` (split, batch_size, context, naive),
        :class:`~neurallm.config.EvalMethods` (cache_pointer, theta, lambda_, dynamic, dynamic_rule, dynamic_lr,
        dynamic_decay, dynamic_window) and ``SourceSettings`` (how to read other ``data``): the flags of ``neurallm eval``. ``amp`` is ``--amp``:
        ``bf16`` runs exact evaluation's products in bfloat16, ``auto`` where the hardware has it (the other methods
        stay float32).
        """
        evaluation, methods, source_settings = split_settings(settings, EvalConfig, EvalMethods, SourceSettings, what="evaluate")
        evaluation, methods = EvalConfig(**evaluation), EvalMethods(**methods)
        split, batch_size, context = evaluation.split, evaluation.batch_size, evaluation.context
        amp_dtype = amp_dtype_for(evaluation.amp, next(self.model.parameters()).device)
        if evaluation.amp == "bf16" and (evaluation.naive or methods.cache_pointer is not None or methods.dynamic):
            raise ConfigError("--amp bf16 applies to exact evaluation only; drop it with --naive, --cache-pointer or --dynamic")
        corpus = self.eval_data(data, splits=(split,), **source_settings)
        ids = corpus.ids(split)
        bptt = self.config.train.bptt
        if methods.cache_pointer is not None:
            pointer = CachePointerSettings(methods.cache_pointer, methods.theta, methods.lambda_)
            result = evaluate_cache_pointer(self.model, ids, pointer, batch_size=batch_size, bptt=bptt, context=context)
        elif methods.dynamic:
            dynamic = DynamicSettings(methods.dynamic_rule, methods.dynamic_lr, methods.dynamic_decay, methods.dynamic_window,
                                      level=self.level)
            rms = self._gradient_rms_for(dynamic.window) if dynamic.rule == "rms" else None
            result = evaluate_dynamic(self.model, ids, dynamic, rms)
        elif evaluation.naive:
            result = evaluate_naive(self.model, ids, batch_size=batch_size, bptt=bptt)
        else:
            result = evaluate(self.model, ids, batch_size=batch_size, bptt=bptt, context=context, amp_dtype=amp_dtype)
        counts = corpus.meta["splits"][split]
        result.unk_share, replaced = unk_shares(counts)
        with_text_units(result, counts)
        warn_if_many_unknown(result.unk_share, f"{split} targets of {corpus.meta.get('source', {}).get('data', data)}",
                             replaced)
        small = small_split_warning(split, result.tokens)
        if small is not None:
            logger.warning(small)
        return result

    def _gradient_rms_for(self, window: int) -> list[torch.Tensor]:
        """Dynamic evaluation's rule rms: each weight's gradient RMS on the run's own training split, measured once
        per window length."""
        if window not in self._gradient_rms:
            try:
                train_ids = self.eval_data(splits=("train",)).ids("train")
            except DataError as error:
                raise DataError(f"--dynamic-rule rms measures its step sizes on the run's training text, which could not "
                                f"be read ({error}); make it available again or pass --dynamic-rule sgd") from None
            logger.info("dynamic evaluation: measuring each weight's gradient RMS on the run's training split "
                        "(--dynamic-rule rms)")
            self._gradient_rms[window] = gradient_rms(self.model, train_ids, window)
        return self._gradient_rms[window]

    def score(self, texts: list[str], **settings) -> list[TextScore]:
        """Log-probability of each text, line by line, by exact evaluation's rules (:mod:`neurallm.scoring`).

        Each text is one document whose lines are read with the lines before them as context (``independent``:
        each line alone). A warning is logged when more than :data:`UNK_WARN_SHARE` of the tokens are ``<unk>``.
        ``settings`` are the fields of :class:`~neurallm.config.ScoreConfig` (independent, context).
        """
        if isinstance(texts, str):
            raise ConfigError("Run.score takes a list of texts; wrap a single text as [text]")
        [given] = split_settings(settings, ScoreConfig, what="score")
        config = ScoreConfig(**given)
        scores = score_texts(self.model, self.vocab, self.config.tokenizer, list(texts), independent=config.independent,
                             bptt=self.config.train.bptt, context=config.context)
        tokens = sum(len(score.tokens) for score in scores)
        warn_if_many_unknown(sum(score.unknown for score in scores) / max(1, tokens), "scored tokens")
        return scores

    def compare_batch_sizes(self, batch_sizes: list[int], data: str | Path | None = None, **settings) -> list[dict]:
        """Naive against exact perplexity per batch size (``neurallm eval --compare-batch-sizes``); ``settings``:
        ``split`` and ``context`` of :class:`~neurallm.config.EvalConfig`, and ``SourceSettings``."""
        evaluation, source_settings = split_settings(settings, EvalConfig, SourceSettings, what="compare_batch_sizes")
        unused = set(evaluation) - {"split", "context"}
        if unused:
            raise ConfigError(f"compare_batch_sizes compares batch sizes and methods itself; drop {', '.join(sorted(unused))}")
        evaluation = EvalConfig(**evaluation)
        ids = self.eval_data(data, splits=(evaluation.split,), **source_settings).ids(evaluation.split)
        return compare_batch_sizes(self.model, ids, batch_sizes, bptt=self.config.train.bptt, context=evaluation.context)

    def generate(self, prompt: str = "", *, on_text: Callable[[str], None] | None = None, stop: Sequence[str] = (),
                 **sampling) -> GenerationResult:
        """Sample text after ``prompt`` (same seed, same text); ``on_text`` receives the text as it is made.

        ``sampling`` are the fields of :class:`~neurallm.sampling.SamplingSettings` (``tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``seed``, ``context``), with the defaults of ``neurallm generate --help``; ``stop``
        strings end the text before them.
        """
        return generate(self.model, self.vocab, self.config.tokenizer, prompt=prompt, on_text=on_text, stop=stop,
                        **asdict(self.sampling(sampling_settings(sampling))))

    def sampling(self, settings: SamplingSettings) -> SamplingSettings:
        """``settings`` with this run's generation context filled in (``bptt + memory`` unless given)."""
        train, model = self.config.train, self.config.model
        return replace(settings, context=generation_context(settings, train.bptt, model.memory))


def load_run(run_dir: str | Path, **settings) -> Run:
    """Load a run directory's model; ``settings`` are :class:`~neurallm.config.LoadSettings`' fields: ``checkpoint``
    (``best``: model.safetensors, ``last``: last.safetensors) and ``device``.

    An NT-ASGD run that has begun averaging is scored, like its validation, with the averaged weights: ``last``
    then loads the running average saved beside the raw weights."""
    [given] = split_settings(settings, LoadSettings, what="load_run")
    load = LoadSettings(**given)
    checkpoint, device = load.checkpoint, load.device
    folder = Path(run_dir)
    config = runfolder.read_run_config(folder)
    vocab = runfolder.read_vocab(folder, config.tokenizer)
    if len(vocab) != config.model.vocab_size:
        raise RunDirError(f"{folder}: vocab.json has {len(vocab)} tokens but config.json says {config.model.vocab_size}; the run directory is inconsistent")
    path = folder / (runfolder.BEST_FILE if checkpoint == "best" else runfolder.LAST_FILE)
    weights.check_weights_fit(path, config.model)  # header against config before a byte of the model is allocated
    model = build_model(config.model)
    tensors, _ = weights.read_safetensors(path)
    weights.load_model_tensors(model, tensors, path)
    if checkpoint == "last":
        weights.apply_saved_average(model, tensors, path)
    model.to(pick_device(device)).eval()
    return Run(folder, config, vocab, model)
