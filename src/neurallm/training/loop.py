"""The training loop: epochs of BPTT windows, validation, checkpoints, resume, clean stops.

The loop knows nothing about a particular model: it uses only the model contract
(:mod:`neurallm.models.contract`). ``self.model`` is the language model itself (state, checkpoints,
evaluation); ``self.step_models`` says what a training step calls, the same model or a wrapper standing in for
it (DistributedDataParallel, ``torch.compile``). Each step goes through :func:`neurallm.training.step.training_step`.
It writes nothing but the run directory, through :mod:`neurallm.training.checkpoint`.

Read it top to bottom: ``__init__`` sets the run up, one job per ``_setup_*`` method (as torchtune's recipes do);
:meth:`Trainer.run` is the loop: epochs of :meth:`Trainer._step` (one window), :meth:`Trainer._decide` (stop or
save now?), then :meth:`Trainer._end_epoch` (:meth:`Trainer._validate` and the record, then
:meth:`Trainer._keep` the checkpoints and curves), and :meth:`Trainer._finish` (the test). What each piece
needs lives beside its kind: the batch source in :mod:`neurallm.data.training_batches`, the DDP/compile wrapping
in :mod:`neurallm.training.step`, the bar and lines in :mod:`neurallm.training.progress`, the metrics record in
:mod:`neurallm.training.epoch_record`, what last.safetensors holds in :mod:`neurallm.training.checkpoint`.

Stops: ``--epochs`` reached, ``--max-time`` seconds of training spent (counted over resumes), or Ctrl-C or
SIGTERM (what ``timeout``, docker, systemd and SLURM send): the first one finishes the current step, saves
and stops cleanly; a second one aborts. In every case the best model is evaluated on the test split, as the
PyTorch example does.

Numerical faults: a non-finite loss or gradient skips the step, restores the weights and optimizer from
``last.safetensors``, divides the learning rate by 4 and says so; a second fault stops training with the
checkpoints intact. On the CPU each step is checked at once; on an accelerator the check is read back once per
``--log-interval`` (and before every checkpoint), so the device never waits for the host in between.

Under ``torchrun`` (:mod:`neurallm.distributed`) every rank runs this loop on its own columns, the step calls
the DistributedDataParallel wrapper, and every branch that could differ between ranks (a fault, Ctrl-C or
SIGTERM, --max-time, a checkpoint being due) is decided with one small all_reduce at the check windows. Rank 0
alone writes the run directory (and the TensorBoard curves) and prints; the checkpoint holds every rank's carried state and RNG states.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neurallm._version import __version__
from neurallm.data.stream import PreparedCorpus
from neurallm.data.training_batches import local_batch_size, training_batches
from neurallm.distributed import SINGLE, Ranks
from neurallm.errors import TrainingError
from neurallm.evaluation import EvalResult, evaluate, with_text_units
from neurallm.models import build_model, count_parameters
from neurallm.models.contract import LanguageModel, State
from neurallm.plots import write_run_curves
from neurallm.run_config import RunConfig
from neurallm.runtime import amp_dtype_for, capture_rng_state, cuda_matmul_precision, pick_device, restore_rng_state, seed_everything
from neurallm.training import checkpoint as ckpt
from neurallm.training.epoch_record import epoch_line, epoch_record
from neurallm.data.trust import log_corpus_warnings
from neurallm.training.footprint import check_model_fits
from neurallm.training.ntasgd import ParameterAverage
from neurallm.training.optim import Schedule, build_optimizer
from neurallm.training.progress import EpochProgress
from neurallm.training.step import LossTracker, StepOutcome, syncs_for_free, training_step, wrap_for_training
from neurallm.training.stopping import StopRequest
from neurallm.training.tensorboard import TensorBoardLog, check_tensorboard_installed
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


class Trainer:
    """One training run over a prepared corpus, writing to ``run_dir``.

    The caller's global random generators (Python, NumPy, torch) are seeded for the run and given back as they
    were by :meth:`close`: the library leaves a program's process-wide state alone.
    """

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
        if config.train.tensorboard and ranks.is_main:
            check_tensorboard_installed()  # one line before anything is built
        self._caller_rng = capture_rng_state()  # given back by close()
        self.device = self._setup_device()
        self.model: LanguageModel = self._setup_model()
        self.optimizer = build_optimizer(self.model, config.train)
        self._setup_data()
        self._setup_step()
        self._setup_schedule()
        self._setup_counters()

    # --- setup, one job each -----------------------------------------------------------------------------

    def _setup_device(self) -> torch.device:
        # under torchrun, CUDA means this rank's own GPU (cuda:LOCAL_RANK)
        device = self.ranks.device if self.ranks.device.type == "cuda" else pick_device(self.config.train.device)
        check_model_fits(self.config.model, self.config.train, device,  # before the allocator fails with a traceback
                         train_tokens=len(self.data.ids("train")))
        return device

    def _setup_model(self) -> LanguageModel:
        seed = self.config.train.seed
        seed_everything(seed)
        model = build_model(self.config.model).to(self.device)
        if self.ranks.distributed:
            # same initial weights everywhere (DDP also broadcasts rank 0's), then each rank its own dropout masks
            seed_everything(seed + self.ranks.rank)
        return model

    def _setup_data(self) -> None:
        self.local_batch_size = local_batch_size(self.config.train.batch_size, self.ranks)
        self.batches = training_batches(self.data.ids("train"), self.config.train, self.device, self.ranks)
        # the state runs on from one window to the next only if both the model and the windows carry it
        self.carry = self.model.carries_state and self.batches.carries_state

    def _setup_step(self) -> None:
        train = self.config.train
        self.step_models = wrap_for_training(self.model, self.device, distributed=self.ranks.distributed,
                                             compile=train.compile, variable_bptt=train.variable_bptt,
                                             full_window=(train.bptt, self.local_batch_size))
        self.amp_dtype = amp_dtype_for(train.amp, self.device)
        # reading a value back stalls an accelerator's queue: check faults every step only where that is free
        self.check_interval = 1 if syncs_for_free(self.device) else train.log_interval
        self.flops_per_token = model_flops_per_token(self.config.model, train.bptt, count_parameters(self.model))
        self.peak_flops = bf16_peak_flops(self.device)

    def _setup_schedule(self) -> None:
        train = self.config.train
        self.schedule = Schedule(train.optimizer, train.lr, train.warmup, train.epochs * len(self.batches), nonmono=train.nonmono,
                                 min_lr_ratio=train.min_lr_ratio)
        self.average = ParameterAverage(self.model)  # NT-ASGD's averaged weights (inactive otherwise)

    def _setup_counters(self) -> None:
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
        self.tensorboard: TensorBoardLog | None = None  # opened by run(), on rank 0

    def close(self) -> None:
        """Drop the DDP / compiled wrapper, close the TensorBoard writer and give the caller's random generators
        back. Call it before the process group is destroyed: a DDP reducer that outlives the group destroys
        gloo's threads from under the GIL at exit and the process never ends."""
        self.step_models = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        restore_rng_state(*self._caller_rng)

    def _cold_state(self) -> State:
        return self.model.init_state(self.local_batch_size, self.device)

    @property
    def global_step(self) -> int:
        """Windows trained over all epochs and resumes: the x axis of the TensorBoard curves."""
        return self.epoch * len(self.batches) + self.window

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of all ranks' devices at ``tokens_per_s`` (all ranks together), or None."""
        return mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.ranks.world_size)

    # --- the loop ----------------------------------------------------------------------------------------

    def run(self, *, resume: bool = False) -> TrainResult:
        train = self.config.train
        if resume:
            if self.ranks.is_main:
                ckpt.remove_stale_temp_files(self.run_dir)
            self.ranks.barrier()
            self.restore_last(full=True)
            logger.info(f"resuming {self.run_dir} at epoch {self.epoch + 1}, batch {self.window}")
        if train.tensorboard and self.ranks.is_main:
            self.tensorboard = TensorBoardLog(self.run_dir, resumed_at=self.global_step if resume else None)
        if not resume:
            self.save_best(math.inf)
            self.save_last()
        stopped_by = None
        with StopRequest() as stop:
            while self.epoch < train.epochs and stopped_by is None:
                stopped_by = self._run_epoch(stop)
        if stopped_by == "max_time":
            logger.info(self._max_time_message())
        return self._finish(stopped_by or "epochs")

    def _run_epoch(self, stop: StopRequest) -> str | None:
        """Train the rest of the current epoch; returns why training stopped early, or None."""
        if self.window == 0:
            self.state = self._cold_state()
            self.tracker.reset()
        self.model.train()
        train = self.config.train
        totals = self.tracker.last
        progress = EpochProgress(epoch=self.epoch, epochs=train.epochs, total=len(self.batches), done=self.window,
                                 show_bar=self.progress, log_interval=train.log_interval, loss_sum=totals.loss_sum,
                                 steps=totals.steps, world_size=self.ranks.world_size, mfu=self.mfu)
        tokens, stopped_by = 0, None
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
            totals = self.tracker.last  # read back by the fault check at a logging window
            point = progress.advance(self.window, tokens, self.schedule.lr, totals.loss_sum, totals.steps)
            if point is not None and self.tensorboard is not None:
                self.tensorboard.progress(self.global_step, point)
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

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutcome:
        """One optimisation step on a window, starting from the carried state or a cold one."""
        train = self.config.train
        state = self.state if self.carry else self.model.init_state(inputs.size(1), self.device)
        self.model_is_best = False
        # variable-length BPTT: a window's share of the learning rate is its share of the mean length
        self.schedule.apply(self.optimizer, inputs.size(0) / train.bptt if train.variable_bptt else 1.0)
        with cuda_matmul_precision(self.device, tf32=True):
            # under DDP the ranks must all take the update or all skip it: the fault check decides that together
            outcome = training_step(self.step_models.for_window(inputs), self.optimizer, inputs, targets, state,
                                    clip=train.clip, skip_nonfinite=self.check_interval == 1 and not self.ranks.distributed,
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

    def _decide(self, stop: StopRequest, due: bool, save_due: bool) -> tuple[str | None, bool]:
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

    def _max_time_message(self) -> str:
        train = self.config.train
        partial = f" and {self.window:,} of {len(self.batches):,} batches of epoch {self.epoch + 1}" if self.window else ""
        return f"stopped by --max-time after {self.epoch} of {train.epochs} epochs{partial} ({self.elapsed:.0f}s of training)"

    # --- the end of an epoch: validation and the record, then checkpoints and curves ----------------------

    def _end_epoch(self, seconds: float, tokens: int) -> None:
        """Validate, record the epoch's metrics, keep the best weights and write the checkpoints.

        Also runs after a --max-time stop in the middle of an epoch (recorded as incomplete)."""
        self._check_faults()
        valid = self._validate()
        epoch_done = self.window >= len(self.batches)
        if epoch_done:
            self.epoch += 1
            self.window = 0
        totals = self.tracker.last
        tokens, loss_sum, steps = self.ranks.sum([tokens, totals.loss_sum, totals.steps])  # of all ranks
        tokens_per_s = tokens / max(seconds, 1e-9)
        utilisation = self.mfu(tokens_per_s)
        record = epoch_record(epoch=self.epoch if epoch_done else self.epoch + 1, complete=epoch_done,
                              train_loss=loss_sum / max(1, steps), valid=valid, lr=self.schedule.lr, seconds=seconds,
                              tokens_per_s=tokens_per_s, mfu=utilisation, level=self.config.tokenizer.level)
        self.metrics.append(record)
        if self.tensorboard is not None:
            self.tensorboard.epoch(self.global_step, record)
        if epoch_done:
            self._after_validation(valid.loss)
        self._keep(valid.loss)
        logger.info(epoch_line(record, seconds=seconds, mfu=utilisation, batches=(self.window, len(self.batches))))

    def _validate(self) -> EvalResult:
        """The validation split's loss of the weights to keep (NT-ASGD: the averaged weights)."""
        self.optimizer.zero_grad(set_to_none=True)  # the next step makes its own; validation reuses their memory
        with self.average.applied():  # NT-ASGD validates (and keeps as best) the averaged weights
            return self.evaluate_split("valid")

    def _after_validation(self, valid_loss: float) -> None:
        # only whole epochs drive the schedule, so a run stopped by --max-time and extended later anneals
        # exactly as an uninterrupted one
        self.schedule.after_validation(valid_loss)
        if self.schedule.averaging and not self.average.active:
            self.average.start()
            logger.info(f"NT-ASGD: validation stalled (--nonmono {self.config.train.nonmono}); averaging the weights from now on")

    def _keep(self, valid_loss: float) -> None:
        """Save the best weights if these are, the last checkpoint, and redraw RUN/curves.png."""
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss = valid_loss
            self.save_best(valid_loss)
        self.save_last()
        if self.ranks.is_main:
            try:
                write_run_curves(self.run_dir, self.metrics, self.config.tokenizer.level)  # redrawn every epoch
            except FileNotFoundError:
                ckpt.check_run_dir_still_there(self.run_dir)  # the folder went: one line, nothing recreated
                raise

    def evaluate_split(self, split: str) -> EvalResult:
        """Exact evaluation of the current weights on ``split`` (in eval mode; the mode is restored)."""
        train = self.config.train
        result = evaluate(self.model, self.data.ids(split), batch_size=train.eval_batch_size, bptt=train.bptt,
                          context=train.eval_context, ranks=self.ranks)
        return with_text_units(result, self.data.meta["splits"][split])

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
        if self.ranks.is_main:  # beside the result they qualify: a test split too small, or mostly <unk>
            log_corpus_warnings(self.data.meta, logger, ("test",))
        return TrainResult(self.run_dir, self.epoch, self.best_valid_loss, test, stopped_by)

    # --- checkpoints: the schema of last.safetensors is in neurallm.training.checkpoint -------------------

    def save_best(self, valid_loss: float) -> None:
        if self.ranks.is_main:
            with self.average.applied():  # NT-ASGD: the averaged weights are the model
                ckpt.save_weights(self.run_dir / ckpt.BEST_FILE, self.model, {"epoch": self.epoch, "valid_loss": valid_loss})
        self.model_is_best = not self.average.active  # averaged weights were saved, not the model's own

    def save_last(self) -> None:
        """Write last.safetensors (rank 0, with every rank's carried state and RNG states gathered to it)."""
        self._check_faults()  # a checkpoint must never hold the weights of a non-finite step
        rng_json, rng_tensors = capture_rng_state()
        carried = {f"carry.{i}": t.cpu() for i, t in enumerate(self.state)} if self.carry and self.window > 0 else {}
        epoch_loss = [self.tracker.last.loss_sum, self.tracker.last.steps]  # this rank's columns
        per_rank = self.ranks.gather(ckpt.RankState(rng_json, {**rng_tensors, **carried}, epoch_loss))
        if per_rank is not None:  # rank 0
            position = ckpt.Position(self.epoch, self.window, self.elapsed, self.faults, self.best_valid_loss,
                                     self.schedule.to_dict(), self.metrics)
            state = ckpt.pack_training_state(position, per_rank, optimizer=self.optimizer, average=self.average.to_state(),
                                             data_key=self.data.meta["key"], version=__version__)
            ckpt.save_last(self.run_dir / ckpt.LAST_FILE, self.model, state)
            ckpt.write_metrics(self.run_dir, self.metrics)
            if self.tensorboard is not None:
                self.tensorboard.flush()  # the curves hold everything up to this checkpoint
        self.ranks.barrier()  # the others may read it next (a fault's restore)

    def restore_last(self, *, full: bool) -> None:
        """Load last.safetensors: weights and optimizer always; position, RNG and state too when ``full``."""
        path = self.run_dir / ckpt.LAST_FILE
        tensors, state = ckpt.load_last(path)
        ckpt.load_model_tensors(self.model, tensors, path)
        self.model_is_best = False
        with ckpt.reading_training_state(path):
            self._apply_training_state(state, path, full=full)

    def _apply_training_state(self, state: ckpt.TrainingState, path: Path, *, full: bool) -> None:
        ckpt.optimizer_from_state(self.optimizer, state.info["optimizer"], state.tensors)
        # NT-ASGD's average goes back with the weights: the steps a fault throws away leave it too
        self.average.load_state(state.info.get("average"), state.tensors)
        if not full:
            return
        ckpt.check_same_run(state, path, data_key=self.data.meta["key"], world_size=self.ranks.world_size)
        position = ckpt.read_position(state)
        self.epoch, self.window, self.elapsed = position.epoch, position.window, position.elapsed
        self.faults, self.best_valid_loss = position.faults, position.best_valid_loss
        own = ckpt.read_rank_state(state, self.ranks.rank)
        self.tracker.reset(*own.epoch_loss)
        saved = Schedule.from_dict(position.schedule)
        # --epochs or --max-time may have been raised: the cosine schedule stretches to the new end
        saved.resumed(self.config.train.epochs * len(self.batches), self.config.train.max_time)
        self.schedule = saved
        self.metrics = position.metrics
        restore_rng_state(own.rng, own.tensors)
        carried = ckpt.carried_state(own, len(self.state))
        self.state = tuple(t.to(self.device) for t in carried) if carried else self._cold_state()
        if self.ranks.is_main:
            ckpt.write_metrics(self.run_dir, self.metrics)
