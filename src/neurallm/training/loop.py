"""The training loop: epochs of BPTT windows, validation, checkpoints, resume, clean stops.

The loop knows nothing about a particular model: it uses only the model contract
(:mod:`neurallm.models.contract`). ``self.model`` is the language model itself (state, checkpoints,
evaluation); ``self.step_model`` is what a training step calls, the same model or a wrapper standing in for it
(DistributedDataParallel, ``torch.compile``). Each step goes through :func:`neurallm.training.step.training_step`.
It writes nothing but the run directory, through :mod:`neurallm.training.checkpoint`.

The pieces, one job each: :meth:`Trainer._step` (one window), :meth:`Trainer._run_epoch` (the windows of an
epoch), :meth:`Trainer._stop_reason` (whether to stop now), :meth:`Trainer._end_epoch` (validation, metrics,
best model) and :meth:`Trainer.save_last` / :meth:`Trainer.save_best` (checkpoints).

Stops: ``--epochs`` reached, ``--max-time`` seconds of training spent (counted over resumes), or Ctrl-C or
SIGTERM (what ``timeout``, docker, systemd and SLURM send): the first one finishes the current step, saves
and stops cleanly; a second one aborts. In every case the best model is evaluated on the test split, as the
PyTorch example does.

Numerical faults: a non-finite loss or gradient skips the step, restores the weights and optimizer from
``last.safetensors``, divides the learning rate by 4 and says so; a second fault stops training with the
checkpoints intact. On the CPU each step is checked at once; on an accelerator the check is read back once per
``--log-interval`` (and before every checkpoint), so the device never waits for the host in between.

Under ``torchrun`` (:mod:`neurallm.distributed`) every rank runs this loop on its own columns, ``step_model``
is the DistributedDataParallel wrapper, and every branch that could differ between ranks (a fault, Ctrl-C or
SIGTERM, --max-time, a checkpoint being due) is decided with one small all_reduce at the check windows. Rank 0
alone writes the run directory and prints; the checkpoint holds every rank's carried state and RNG states.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neurallm import __version__
from neurallm.config import RunConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows, batchify
from neurallm.data.stream import PreparedCorpus
from neurallm.data.variable_bptt import VariableWindows
from neurallm.distributed import SINGLE, Ranks
from neurallm.errors import TrainingError
from neurallm.evaluation import EvalResult, evaluate, with_text_units
from neurallm.models import build_model, count_parameters
from neurallm.models.contract import LanguageModel, State
from neurallm.plots import write_run_curves
from neurallm.runtime import amp_dtype_for, capture_rng_state, cuda_matmul_precision, pick_device, restore_rng_state, seed_everything
from neurallm.training import checkpoint as ckpt
from neurallm.training.footprint import check_model_fits
from neurallm.training.ntasgd import ParameterAverage
from neurallm.training.optim import Schedule, build_optimizer
from neurallm.training.step import LossTracker, StepOutcome, compile_for_training, syncs_for_free, training_step
from neurallm.training.progress import IntervalMeter
from neurallm.training.throughput import bf16_peak_flops, mfu, model_flops_per_token

logger = logging.getLogger(__name__)

FAULT_LR_FACTOR = 0.25


@dataclass
class TrainResult:
    """What a call to :func:`train` achieved.

    Attributes:
        run_dir: the run directory.
        epochs_completed: full epochs done (over all resumes).
        best_valid_loss: lowest validation loss (nats per token).
        test: the best model on the test split (None if it was not evaluated).
        stopped_by: ``epochs``, ``max_time``, ``dry_run`` or ``interrupt``.
    """

    run_dir: Path
    epochs_completed: int
    best_valid_loss: float
    test: EvalResult | None
    stopped_by: str


class _StopRequest:
    """First Ctrl-C or SIGTERM: finish the step, save and stop cleanly. A second Ctrl-C: abort at once.

    SIGTERM never aborts: torchrun answers a Ctrl-C by sending SIGTERM to workers that already got the SIGINT,
    and that must not turn a clean stop into an abort.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""  # "Ctrl-C" or "SIGTERM", for the message
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.reason = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _tqdm_class():
    """tqdm's notebook bar where it can draw (Jupyter with ipywidgets), its console bar everywhere else.

    ``tqdm.auto`` in a Jupyter kernel without ipywidgets warns (TqdmWarning / TqdmExperimentalWarning) and draws
    nothing; the console class with ``disable`` set (stderr is no terminal there) lets the plain progress lines
    show instead.
    """
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        from tqdm import tqdm

        return tqdm
    import warnings

    from tqdm import TqdmExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmExperimentalWarning)
        from tqdm.auto import tqdm
    return tqdm


class _Progress:
    """The epoch's progress bar (tqdm); the loss it shows is refreshed every --log-interval windows."""

    def __init__(self, trainer: "Trainer", total: int) -> None:
        tqdm = _tqdm_class()
        self.trainer = trainer
        self.started = time.perf_counter()
        train = trainer.config.train
        self.bar = tqdm(total=total, initial=trainer.window, desc=f"epoch {trainer.epoch + 1}/{train.epochs}",
                        disable=not trainer.progress, leave=False, unit="batch", dynamic_ncols=True)
        self.lines = IntervalMeter(trainer.tracker.last.loss_sum, trainer.tracker.last.steps)

    def advance(self, tokens: int) -> None:
        trainer = self.trainer
        self.bar.update(1)
        if not (trainer.window % trainer.config.train.log_interval == 0 or trainer.window == self.bar.total):
            return
        totals = trainer.tracker.last  # read back by the fault check at this same window
        if trainer.progress:
            mean = totals.loss_sum / max(1, totals.steps)
            rate = tokens * trainer.ranks.world_size / max(1e-9, time.perf_counter() - self.started)  # all ranks
            postfix = dict(loss=f"{mean:.3f}", ppl=f"{math.exp(min(mean, 50)):.1f}", lr=f"{trainer.schedule.lr:.3g}", tok_s=f"{rate:,.0f}")
            utilisation = trainer.mfu(rate)
            if utilisation is not None:
                postfix["mfu"] = f"{utilisation:.1%}"
            self.bar.set_postfix(postfix)
        else:  # no terminal (a log, CI, a pipe): the PyTorch example's plain line instead of a bar
            logger.info(self.lines.line(trainer.epoch + 1, trainer.window, self.bar.total, trainer.schedule.lr,
                                        totals.loss_sum, totals.steps))

    def close(self) -> float:
        """Close the bar; the seconds since the epoch (or its resumed part) started."""
        self.bar.close()
        return time.perf_counter() - self.started


class Trainer:
    """One training run over a prepared corpus, writing to ``run_dir``."""

    def __init__(
        self,
        run_dir: Path,
        config: RunConfig,
        data: PreparedCorpus,
        *,
        progress: bool | None = None,
        save_every: float = 300.0,
        ranks: Ranks = SINGLE,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.data = data
        self.ranks = ranks
        self.progress = ranks.is_main and (sys.stderr.isatty() if progress is None else progress)  # one bar for all
        self.save_every = save_every
        train = config.train
        # under torchrun, CUDA means this rank's own GPU (cuda:LOCAL_RANK)
        self.device = ranks.device if ranks.device.type == "cuda" else pick_device(train.device)
        check_model_fits(config.model, train, self.device)  # before the allocator fails with a traceback
        seed_everything(train.seed)
        self.model: LanguageModel = build_model(config.model).to(self.device)
        if ranks.distributed:
            # same initial weights everywhere (DDP also broadcasts rank 0's), then each rank its own dropout masks
            seed_everything(train.seed + ranks.rank)
        self.optimizer = build_optimizer(self.model, train)
        self.local_batch_size = _local_batch_size(train.batch_size, ranks)
        train_ids = data.ids("train")
        if train.shuffle_windows:
            self.batches = ShuffledWindows(train_ids, train.bptt, train.batch_size, train.seed, self.device,
                                           ranks.rank, ranks.world_size)
        else:
            # each rank trains its own contiguous columns of the whole --batch-size stream
            own_columns = batchify(train_ids, train.batch_size)[:, ranks.share(train.batch_size)]
            if train.variable_bptt:  # the same seed on every rank: the same window lengths
                self.batches = VariableWindows(own_columns, train.bptt, train.seed, self.device)
            else:
                self.batches = ContiguousBatches(own_columns, train.bptt, self.device)
        self.carry = self.model.carries_state and self.batches.carries_state
        # what a training step calls: the model itself, or a wrapper standing in for it (DDP, torch.compile)
        self.step_model: torch.nn.Module = self.model
        if ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # Under --compile a window of another shape than the usual one (an epoch's shorter last window, a smaller last
        # batch of shuffled windows) runs uncompiled: compiling for it would stall the run for one step (27 s for the
        # GPT-2-small shape on an H100). With --variable-bptt every length is usual: the compiled graph takes them all.
        self.full_window = (train.bptt, self.local_batch_size)
        self.odd_window_model: torch.nn.Module | None = None
        if train.compile:
            if not train.variable_bptt:
                self.odd_window_model = self.step_model
            self.step_model = compile_for_training(self.model, self.step_model)
        self.amp_dtype = amp_dtype_for(train.amp, self.device)
        # reading a value back stalls an accelerator's queue: check faults every step only where that is free
        self.check_interval = 1 if syncs_for_free(self.device) else train.log_interval
        self.flops_per_token = model_flops_per_token(config.model, train.bptt, count_parameters(self.model))
        self.peak_flops = bf16_peak_flops(self.device)
        self.schedule = Schedule(train.optimizer, train.lr, train.warmup, train.epochs * len(self.batches), nonmono=train.nonmono)
        self.average = ParameterAverage(self.model)  # NT-ASGD's averaged weights (inactive otherwise)
        self.epoch = 0  # completed epochs
        self.window = 0  # next window of the current epoch
        self.elapsed = 0.0  # seconds of training over all resumes
        self.faults = 0
        self.best_valid_loss = math.inf  # of the weights in model.safetensors
        self.model_is_best = False  # the model holds exactly the weights in model.safetensors
        self.metrics: list[dict] = []
        # train loss of the current epoch so far: saved mid-epoch so a resumed epoch reports the whole epoch's mean
        self.tracker = LossTracker(self.device)
        self.state = self._cold_state()

    def close(self) -> None:
        """Drop the DDP / compiled wrapper. Call it before the process group is destroyed: a DDP reducer that
        outlives the group destroys gloo's threads from under the GIL at exit and the process never ends."""
        self.step_model = self.model

    def _cold_state(self) -> State:
        return self.model.init_state(self.local_batch_size, self.device)

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of all ranks' devices at ``tokens_per_s`` (all ranks together), or None."""
        return mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.ranks.world_size)

    # --- checkpoints -------------------------------------------------------------------------------------

    def save_last(self) -> None:
        """Write last.safetensors (rank 0, with every rank's carried state and RNG states gathered to it)."""
        self._check_faults()  # a checkpoint must never hold the weights of a non-finite step
        rng_json, rng_tensors = capture_rng_state()
        carried = {f"carry.{i}": t.cpu() for i, t in enumerate(self.state)} if self.carry and self.window > 0 else {}
        epoch_loss = [self.tracker.last.loss_sum, self.tracker.last.steps]  # this rank's columns
        gathered = self.ranks.gather((rng_json, {**rng_tensors, **carried}, epoch_loss))
        if gathered is not None:
            self._write_last(gathered)
        self.ranks.barrier()  # the others may read it next (a fault's restore)

    def _write_last(self, per_rank: list[tuple[dict, dict[str, torch.Tensor], list]]) -> None:
        optim_json, optim_tensors = ckpt.optimizer_to_state(self.optimizer)
        average_json, average_tensors = self.average.to_state()  # the same on every rank: rank 0's are kept
        (rng_json, rank_tensors, epoch_loss), *others = per_rank
        for rank, (_, tensors, _) in enumerate(others, start=1):
            rank_tensors = {**rank_tensors, **{f"{_rank_prefix(rank)}{k}": v for k, v in tensors.items()}}
        info = {
            "neurallm_version": __version__,
            "epoch": self.epoch,
            "window": self.window,
            "elapsed": self.elapsed,
            "faults": self.faults,
            "best_valid_loss": None if math.isinf(self.best_valid_loss) else self.best_valid_loss,
            "epoch_loss": epoch_loss,
            "schedule": self.schedule.to_dict(),
            "optimizer": optim_json,
            "average": average_json,
            "rng": rng_json,
            "rank_rng": [rng for rng, _, _ in others],  # ranks 1.. (rank 0's is "rng")
            "rank_epoch_loss": [loss for _, _, loss in others],  # and "epoch_loss"
            "world_size": self.ranks.world_size,
            "metrics": self.metrics,
            "data_key": self.data.meta["key"],
        }
        ckpt.save_last(self.run_dir / ckpt.LAST_FILE, self.model, ckpt.TrainingState(info, {**rank_tensors, **optim_tensors, **average_tensors}))
        ckpt.write_metrics(self.run_dir, self.metrics)

    def restore_last(self, *, full: bool) -> None:
        """Load last.safetensors: weights and optimizer always; position, RNG and state too when ``full``."""
        path = self.run_dir / ckpt.LAST_FILE
        tensors, state = ckpt.load_last(path)
        ckpt.load_model_tensors(self.model, tensors, path)
        self.model_is_best = False
        with ckpt.reading_training_state(path):
            self._apply_training_state(state, full=full)

    def _apply_training_state(self, state: ckpt.TrainingState, *, full: bool) -> None:
        path = self.run_dir / ckpt.LAST_FILE
        ckpt.optimizer_from_state(self.optimizer, state.info["optimizer"], state.tensors)
        # NT-ASGD's average goes back with the weights: the steps a fault throws away leave it too
        self.average.load_state(state.info.get("average"), state.tensors)
        if not full:
            return
        info = state.info
        if info.get("data_key") != self.data.meta["key"]:
            raise TrainingError(
                f"{path} was trained on data prepared as {info.get('data_key')}, but --data now gives "
                f"{self.data.meta['key']} (the text or its settings changed); resume with the original data"
            )
        saved_world = info.get("world_size", 1)
        if saved_world != self.ranks.world_size:
            raise TrainingError(
                f"{path} was trained by {saved_world} process(es) and holds the carried state and random streams of "
                f"that many ranks, but this is {self.ranks.world_size}; resume with the same number "
                f"(torchrun --nproc_per_node {saved_world} …{', or plain neurallm train' if saved_world == 1 else ''})"
            )
        self.epoch, self.window, self.elapsed = info["epoch"], info["window"], info["elapsed"]
        self.faults = info.get("faults", 0)
        self.best_valid_loss = math.inf if info.get("best_valid_loss") is None else info["best_valid_loss"]
        epoch_loss = info.get("epoch_loss", [0.0, 0]) if self.ranks.is_main else info["rank_epoch_loss"][self.ranks.rank - 1]
        self.tracker.reset(*epoch_loss)
        saved = Schedule.from_dict(info["schedule"])
        # --epochs or --max-time may have been raised: the cosine schedule stretches to the new end
        saved.resumed(self.config.train.epochs * len(self.batches), self.config.train.max_time)
        self.schedule = saved
        self.metrics = info["metrics"]
        prefix = _rank_prefix(self.ranks.rank)
        own = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)} if prefix else state.tensors
        restore_rng_state(info["rng"] if self.ranks.is_main else info["rank_rng"][self.ranks.rank - 1], own)
        carried = [own[f"carry.{i}"] for i in range(len(self.state)) if f"carry.{i}" in own]
        self.state = tuple(t.to(self.device) for t in carried) if carried else self._cold_state()
        if self.ranks.is_main:
            ckpt.write_metrics(self.run_dir, self.metrics)

    def save_best(self, valid_loss: float) -> None:
        if self.ranks.is_main:
            with self.average.applied():  # NT-ASGD: the averaged weights are the model
                ckpt.save_weights(self.run_dir / ckpt.BEST_FILE, self.model, {"epoch": self.epoch, "valid_loss": valid_loss})
        self.model_is_best = not self.average.active  # averaged weights were saved, not the model's own

    # --- training ----------------------------------------------------------------------------------------

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutcome:
        """One optimisation step on a window, starting from the carried state or a cold one."""
        state = self.state if self.carry else self.model.init_state(inputs.size(1), self.device)
        self.model_is_best = False
        # variable-length BPTT: a window's share of the learning rate is its share of the mean length
        self.schedule.apply(self.optimizer, inputs.size(0) / self.config.train.bptt if self.config.train.variable_bptt else 1.0)
        # under DDP the ranks must all take the update or all skip it: the fault check decides that together
        step_model = self.step_model
        if self.odd_window_model is not None and tuple(inputs.shape) != self.full_window:
            step_model = self.odd_window_model
        with cuda_matmul_precision(self.device, tf32=True):
            outcome = training_step(step_model, self.optimizer, inputs, targets, state, clip=self.config.train.clip,
                                    skip_nonfinite=self.check_interval == 1 and not self.ranks.distributed,
                                    amp_dtype=self.amp_dtype)
        self.tracker.add(outcome)
        self.state = outcome.state
        return outcome

    def _check_faults(self) -> bool:
        """Read the losses back (one host synchronisation); handle a non-finite step on any rank. True if there was one."""
        if self.tracker.pending == 0:  # the same on every rank: all take the same number of steps
            return False
        [faulty] = self.ranks.any([self.tracker.flush().faulty > 0])
        if not faulty:
            return False
        self._handle_fault()
        return True

    def _handle_fault(self) -> None:
        self.faults += 1
        where = f"epoch {self.epoch + 1}, batch {self.window}"
        if self.faults > 1:
            raise TrainingError(
                f"non-finite loss again at {where}; training stopped. The last good checkpoints in {self.run_dir} "
                "are intact: lower --lr or --clip and train again"
            )
        self.restore_last(full=False)
        self.schedule.scale(FAULT_LR_FACTOR)
        self.state = self._cold_state()
        # INFO, not WARNING: a recovered fault is a line of the training log (stdout), like the epoch lines
        logger.info(f"warning: non-finite loss at {where}: restored the last good weights and lowered the learning rate to {self.schedule.lr:g}")

    def evaluate_split(self, split: str) -> EvalResult:
        """Exact evaluation of the current weights on ``split`` (in eval mode; the mode is restored)."""
        train = self.config.train
        result = evaluate(self.model, self.data.ids(split), batch_size=train.eval_batch_size, bptt=train.bptt,
                          context=train.eval_context, ranks=self.ranks)
        return with_text_units(result, self.data.meta["splits"][split])

    def run(self, *, resume: bool = False) -> TrainResult:
        train = self.config.train
        if resume:
            if self.ranks.is_main:
                ckpt.remove_stale_temp_files(self.run_dir)
            self.ranks.barrier()
            self.restore_last(full=True)
            logger.info(f"resuming {self.run_dir} at epoch {self.epoch + 1}, batch {self.window}")
        else:
            self.save_best(math.inf)
            self.save_last()
        stopped_by = None
        with _StopRequest() as stop:
            while self.epoch < train.epochs and stopped_by is None:
                stopped_by = self._run_epoch(stop)
        if stopped_by == "max_time":
            logger.info(self._max_time_message())
        return self._finish(stopped_by or "epochs")

    def _max_time_message(self) -> str:
        train = self.config.train
        partial = f" and {self.window:,} of {len(self.batches):,} batches of epoch {self.epoch + 1}" if self.window else ""
        return f"stopped by --max-time after {self.epoch} of {train.epochs} epochs{partial} ({self.elapsed:.0f}s of training)"

    def _run_epoch(self, stop: _StopRequest) -> str | None:
        """Train the rest of the current epoch; returns why training stopped early, or None."""
        if self.window == 0:
            self.state = self._cold_state()
            self.tracker.reset()
        self.model.train()
        progress = _Progress(self, len(self.batches))
        tokens, stopped_by = 0, None
        train = self.config.train
        last_save = time.perf_counter()
        for inputs, targets in self.batches.epoch(self.epoch, self.window):
            step_started = time.perf_counter()
            self._step(inputs, targets)
            self.window += 1
            due = self.window % self.check_interval == 0 or self.window == len(self.batches)
            if due and self._check_faults():
                continue
            self.average.update()
            self.elapsed += time.perf_counter() - step_started
            # an accelerator learns of a fault only at the next check; its schedule then counts the faulty step
            self.schedule.after_step(self.elapsed, train.max_time)
            tokens += inputs.numel()
            progress.advance(tokens)
            stopped_by, save_now = self._decide(stop, due, time.perf_counter() - last_save >= self.save_every)
            if stopped_by is not None:
                break
            if save_now:
                self.save_last()
                last_save = time.perf_counter()
        seconds = progress.close()
        if stopped_by == "interrupt":
            logger.info(f"interrupted ({stop.reason}): saving the current state and evaluating the best model")
            self.save_last()
            return stopped_by
        self._end_epoch(seconds, tokens)
        return stopped_by

    def _decide(self, stop: _StopRequest, due: bool, save_due: bool) -> tuple[str | None, bool]:
        """Whether to stop now and why (``interrupt`` after a Ctrl-C or SIGTERM, ``dry_run`` after one batch of
        --dry-run, ``max_time`` once --max-time is spent; None: go on), and whether to write a checkpoint now.

        Under torchrun the ranks decide together, at the fault-check windows (``due``): one all_reduce of the
        three flags, so every rank stops, or saves, at the same window."""
        max_time = self.config.train.max_time
        flags = [stop.requested, max_time is not None and self.elapsed >= max_time, save_due]
        if self.ranks.distributed:
            flags = self.ranks.any(flags) if due else [False, False, False]
        interrupt, out_of_time, save_now = flags
        if interrupt:
            return "interrupt", False
        if self.config.train.dry_run:
            return "dry_run", False
        if out_of_time:
            return "max_time", False
        return None, save_now

    def _end_epoch(self, seconds: float, tokens: int) -> None:
        """Validate, record the epoch's metrics, keep the best weights and write the checkpoints.

        Also runs after a --max-time stop in the middle of an epoch (recorded as incomplete)."""
        self._check_faults()
        train = self.config.train
        self.optimizer.zero_grad(set_to_none=True)  # the next step makes its own; validation reuses their memory
        with self.average.applied():  # NT-ASGD validates (and keeps as best) the averaged weights
            valid = self.evaluate_split("valid")
        epoch_done = self.window >= len(self.batches)
        if epoch_done:
            self.epoch += 1
            self.window = 0
        totals = self.tracker.last
        tokens, loss_sum, steps = self.ranks.sum([tokens, totals.loss_sum, totals.steps])  # of all ranks
        tokens_per_s = tokens / max(seconds, 1e-9)
        utilisation = self.mfu(tokens_per_s)
        record = {
            "epoch": self.epoch if epoch_done else self.epoch + 1,
            "complete": epoch_done,
            "train_loss": loss_sum / max(1, steps),
            "valid_loss": valid.loss,
            "valid_ppl": valid.ppl,
            "lr": self.schedule.lr,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": None if utilisation is None else round(utilisation, 4),  # Transformers on a GPU of known peak
            "valid_tokens": valid.tokens,
        }
        if self.config.tokenizer.level == "char":
            record["valid_bpc"] = valid.bpc
        if valid.bpb is not None:
            record["valid_bpb"] = valid.bpb
        self.metrics.append(record)
        if epoch_done:
            # only whole epochs drive the schedule, so a run stopped by --max-time and extended later anneals
            # exactly as an uninterrupted one
            self.schedule.after_validation(valid.loss)
            if self.schedule.averaging and not self.average.active:
                self.average.start()
                logger.info(f"NT-ASGD: validation stalled (--nonmono {train.nonmono}); averaging the weights from now on")
        if valid.loss < self.best_valid_loss:
            self.best_valid_loss = valid.loss
            self.save_best(valid.loss)
        self.save_last()
        if self.ranks.is_main:
            try:
                write_run_curves(self.run_dir, self.metrics, self.config.tokenizer.level)  # RUN/curves.png, redrawn every epoch
            except FileNotFoundError:
                ckpt.check_run_dir_still_there(self.run_dir)  # the folder went: one line, nothing recreated
                raise
        mfu_text = "" if utilisation is None else f" | MFU {utilisation:.1%}"
        logger.info(
            f"| end of epoch {record['epoch']:3d} | time {seconds:6.1f}s | train loss {record['train_loss']:.3f} | "
            f"valid loss {valid.loss:.3f} | valid ppl {valid.ppl:9.2f} | lr {self.schedule.lr:.3g} | "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu_text}"
        )

    def _finish(self, stopped_by: str) -> TrainResult:
        best_path = self.run_dir / ckpt.BEST_FILE
        # the last step's gradients are not needed for the test: freed, the evaluation's buffers reuse their memory
        self.optimizer.zero_grad(set_to_none=True)
        if not self.model_is_best:  # reading the file holds a second copy of the weights for a moment (+24 MB here)
            tensors, _ = ckpt.read_safetensors(best_path)
            ckpt.load_model_tensors(self.model, tensors, best_path)
            del tensors
        test = self.evaluate_split("test")
        results = {"test": test.to_dict(self.config.tokenizer.level), "stopped_by": stopped_by,
                   "epochs_completed": self.epoch, "best_valid_loss": self.best_valid_loss}
        if self.ranks.is_main:
            ckpt.write_results(self.run_dir, results)
        bpc = f" | test bpc {test.bpc:.3f}" if self.config.tokenizer.level == "char" else ""
        bpc += f" | test bpb {test.bpb:.3f}" if test.bpb is not None else ""
        logger.info(f"| end of training | test loss {test.loss:.3f} | test ppl {test.ppl:9.2f}{bpc} | {test.tokens:,} tokens scored")
        return TrainResult(self.run_dir, self.epoch, self.best_valid_loss, test, stopped_by)


def _rank_prefix(rank: int) -> str:
    """Key prefix of a rank's RNG and carried state in last.safetensors (rank 0 keeps the single-process keys)."""
    return f"rank{rank}." if rank else ""


def _local_batch_size(batch_size: int, ranks: Ranks) -> int:
    """Columns (or windows) per rank: ``--batch-size`` is the total over all ranks and must split evenly, so that
    averaging the ranks' gradients gives the gradient of the whole batch."""
    if batch_size % ranks.world_size:
        raise TrainingError(f"--batch-size {batch_size} does not split evenly over {ranks.world_size} processes; "
                            f"use a multiple of {ranks.world_size} (it is the total number of columns of all ranks)")
    return batch_size // ranks.world_size
