"""The training loop: epochs of BPTT windows, validation, checkpoints, resume, clean stops.

The loop knows nothing about a particular model: it needs ``init_state``, ``forward(input, state)``,
``head.loss`` and ``carries_state``. It writes nothing but the run directory, through
:mod:`neurallm.training.checkpoint`.

Stops: ``--epochs`` reached, ``--max-time`` seconds of training spent (counted over resumes), or Ctrl-C or
SIGTERM (what ``timeout``, docker, systemd and SLURM send): the first one finishes the current step, saves
and stops cleanly; a second one aborts. In every case the best model is evaluated on the test split, as the
PyTorch example does.

Numerical faults: a non-finite loss or gradient skips the step, restores the weights and optimizer from
``last.safetensors``, divides the learning rate by 4 and says so; a second fault stops training with the
checkpoints intact.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neurallm import __version__
from neurallm.config import RunConfig
from neurallm.data.batching import ContiguousBatches, ShuffledWindows, batchify
from neurallm.data.stream import PreparedCorpus
from neurallm.errors import TrainingError
from neurallm.evaluation import EvalResult, evaluate
from neurallm.models import build_model
from neurallm.runtime import capture_rng_state, log_line, pick_device, restore_rng_state, seed_everything
from neurallm.training import checkpoint as ckpt
from neurallm.training.optim import Schedule, build_optimizer

FAULT_LR_FACTOR = 0.25


@dataclass
class TrainResult:
    """What a call to :func:`train` achieved.

    Attributes:
        run_dir: the run directory.
        epochs_completed: full epochs done (over all resumes).
        best_valid_loss: lowest validation loss (nats per token).
        test: the best model on the test split (None if it was not evaluated).
        stopped_by: ``epochs``, ``max_time`` or ``interrupt``.
    """

    run_dir: Path
    epochs_completed: int
    best_valid_loss: float
    test: EvalResult | None
    stopped_by: str


class _StopRequest:
    """First Ctrl-C or SIGTERM: finish the step, save and stop cleanly. Second: abort at once."""

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
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.reason = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def detach_state(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cut the graph at the window edge (truncated BPTT) while keeping the state's values."""
    return tuple(t.detach() for t in state)


class Trainer:
    """One training run over a prepared corpus, writing to ``run_dir``."""

    def __init__(
        self,
        run_dir: Path,
        config: RunConfig,
        data: PreparedCorpus,
        *,
        progress: bool | None = None,
        log: Callable[[str], None] = log_line,
        save_every: float = 300.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.data = data
        self.log = log
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.save_every = save_every
        train = config.train
        self.device = pick_device(train.device)
        seed_everything(train.seed)
        self.model = build_model(config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, train)
        train_ids = data.ids("train")
        if train.shuffle_windows:
            self.batches = ShuffledWindows(train_ids, train.bptt, train.batch_size, train.seed)
        else:
            self.batches = ContiguousBatches(batchify(train_ids, train.batch_size).to(self.device), train.bptt)
        self.carry = self.model.carries_state and self.batches.carries_state
        self.schedule = Schedule(train.optimizer, train.lr, train.warmup, train.epochs * len(self.batches))
        self.epoch = 0  # completed epochs
        self.window = 0  # next window of the current epoch
        self.elapsed = 0.0  # seconds of training over all resumes
        self.faults = 0
        self.best_valid_loss = math.inf  # of the weights in model.safetensors
        self.metrics: list[dict] = []
        # train loss of the current epoch so far: saved mid-epoch so a resumed epoch reports the whole epoch's mean
        self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        self.state = self._cold_state()

    def _cold_state(self) -> tuple[torch.Tensor, ...]:
        return self.model.init_state(self.config.train.batch_size, self.device)

    # --- checkpoints -------------------------------------------------------------------------------------

    def save_last(self) -> None:
        rng_json, rng_tensors = capture_rng_state()
        optim_json, optim_tensors = ckpt.optimizer_to_state(self.optimizer)
        carried = {f"carry.{i}": t for i, t in enumerate(self.state)} if self.carry and self.window > 0 else {}
        info = {
            "neurallm_version": __version__,
            "epoch": self.epoch,
            "window": self.window,
            "elapsed": self.elapsed,
            "faults": self.faults,
            "best_valid_loss": None if math.isinf(self.best_valid_loss) else self.best_valid_loss,
            "epoch_loss": [self.epoch_loss_sum, self.epoch_loss_count],
            "schedule": self.schedule.to_dict(),
            "optimizer": optim_json,
            "rng": rng_json,
            "metrics": self.metrics,
            "data_key": self.data.meta["key"],
        }
        ckpt.save_last(self.run_dir / ckpt.LAST_FILE, self.model, ckpt.TrainingState(info, {**rng_tensors, **optim_tensors, **carried}))
        ckpt.write_metrics(self.run_dir, self.metrics)

    def restore_last(self, *, full: bool) -> None:
        """Load last.safetensors: weights and optimizer always; position, RNG and state too when ``full``."""
        path = self.run_dir / ckpt.LAST_FILE
        tensors, state = ckpt.load_last(path)
        ckpt.load_model_tensors(self.model, tensors, path)
        with ckpt.reading_training_state(path):
            self._apply_training_state(state, full=full)

    def _apply_training_state(self, state: ckpt.TrainingState, *, full: bool) -> None:
        path = self.run_dir / ckpt.LAST_FILE
        ckpt.optimizer_from_state(self.optimizer, state.info["optimizer"], state.tensors)
        if not full:
            return
        info = state.info
        if info.get("data_key") != self.data.meta["key"]:
            raise TrainingError(
                f"{path} was trained on data prepared as {info.get('data_key')}, but --data now gives "
                f"{self.data.meta['key']} (the text or its settings changed); resume with the original data"
            )
        self.epoch, self.window, self.elapsed = info["epoch"], info["window"], info["elapsed"]
        self.faults = info.get("faults", 0)
        self.best_valid_loss = math.inf if info.get("best_valid_loss") is None else info["best_valid_loss"]
        self.epoch_loss_sum, self.epoch_loss_count = info.get("epoch_loss", [0.0, 0])
        saved = Schedule.from_dict(info["schedule"])
        # --epochs may have been raised: the cosine schedule stretches to the new end
        saved.total_steps = self.config.train.epochs * len(self.batches)
        self.schedule = saved
        self.metrics = info["metrics"]
        restore_rng_state(info["rng"], state.tensors)
        carried = [state.tensors[f"carry.{i}"] for i in range(len(self.state)) if f"carry.{i}" in state.tensors]
        self.state = tuple(t.to(self.device) for t in carried) if carried else self._cold_state()
        ckpt.write_metrics(self.run_dir, self.metrics)

    def save_best(self, valid_loss: float) -> None:
        ckpt.save_weights(self.run_dir / ckpt.BEST_FILE, self.model, {"epoch": self.epoch, "valid_loss": valid_loss})

    # --- training ----------------------------------------------------------------------------------------

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float | None:
        """One optimisation step; returns the loss, or None if it was not finite (nothing applied)."""
        train = self.config.train
        if self.carry:
            self.state = detach_state(self.state)
        else:
            self.state = self.model.init_state(inputs.size(1), self.device)
        self.schedule.apply(self.optimizer)
        features, new_state = self.model(inputs, self.state)
        loss = self.model.head.loss(features, targets)
        if not torch.isfinite(loss.detach()):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # --clip 0 turns clipping off (an infinite bound scales by exactly 1), not the check for a non-finite gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip if train.clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            return None
        self.optimizer.step()
        self.schedule.after_step()
        self.state = new_state
        return loss.item()

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
        self.log(f"warning: non-finite loss at {where}: restored the last good weights and lowered the learning rate to {self.schedule.lr:g}")

    def validate(self) -> EvalResult:
        train = self.config.train
        self.model.eval()
        result = evaluate(self.model, self.data.ids("valid"), batch_size=train.eval_batch_size, bptt=train.bptt, context=train.eval_context)
        self.model.train()
        return result

    def run(self, *, resume: bool = False) -> TrainResult:
        train = self.config.train
        if resume:
            ckpt.remove_stale_temp_files(self.run_dir)
            self.restore_last(full=True)
            self.log(f"resuming {self.run_dir} at epoch {self.epoch + 1}, batch {self.window}")
        else:
            self.save_best(math.inf)
            self.save_last()
        stopped_by = "epochs"
        tokens_per_window = train.batch_size * train.bptt
        with _StopRequest() as stop:
            while self.epoch < train.epochs and stopped_by == "epochs":
                stopped_by = self._run_epoch(stop, tokens_per_window)
        return self._finish(stopped_by)

    def _run_epoch(self, stop: _StopRequest, tokens_per_window: int) -> str:
        from tqdm.auto import tqdm

        train = self.config.train
        self.model.train()
        if self.window == 0:
            self.state = self._cold_state()
            self.epoch_loss_sum, self.epoch_loss_count = 0.0, 0
        epoch_started, last_save = time.perf_counter(), time.perf_counter()
        tokens = 0
        stopped_by = "epochs"
        bar = tqdm(total=len(self.batches), initial=self.window, desc=f"epoch {self.epoch + 1}/{train.epochs}",
                   disable=not self.progress, leave=False, unit="batch", dynamic_ncols=True)
        for inputs, targets in self.batches.epoch(self.epoch, self.window):
            step_started = time.perf_counter()
            loss = self._step(inputs, targets)
            self.window += 1
            if loss is None:
                self._handle_fault()
                continue
            step_seconds = time.perf_counter() - step_started
            self.elapsed += step_seconds
            tokens += inputs.numel()
            self.epoch_loss_sum, self.epoch_loss_count = self.epoch_loss_sum + loss, self.epoch_loss_count + 1
            bar.update(1)
            if self.window % train.log_interval == 0 or self.window == len(self.batches):
                mean = self.epoch_loss_sum / self.epoch_loss_count
                rate = tokens / max(1e-9, time.perf_counter() - epoch_started)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{math.exp(min(mean, 50)):.1f}", lr=f"{self.schedule.lr:.3g}", tok_s=f"{rate:,.0f}")
            if stop.requested:
                stopped_by = "interrupt"
                break
            if train.max_time is not None and self.elapsed >= train.max_time:
                stopped_by = "max_time"
                break
            if time.perf_counter() - last_save >= self.save_every:
                self.save_last()
                last_save = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - epoch_started
        if stopped_by == "interrupt":
            self.log(f"interrupted ({stop.reason}): saving the current state and evaluating the best model")
            self.save_last()
            return stopped_by
        valid = self.validate()
        epoch_done = self.window >= len(self.batches)
        if epoch_done:
            self.epoch += 1
            self.window = 0
        record = {
            "epoch": self.epoch if epoch_done else self.epoch + 1,
            "complete": epoch_done,
            "train_loss": self.epoch_loss_sum / max(1, self.epoch_loss_count),
            "valid_loss": valid.loss,
            "valid_ppl": valid.ppl,
            "lr": self.schedule.lr,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "valid_tokens": valid.tokens,
        }
        if self.config.tokenizer.level == "char":
            record["valid_bpc"] = valid.bpc
        self.metrics.append(record)
        if epoch_done:
            # only whole epochs drive the schedule, so a run stopped by --max-time and extended later anneals
            # exactly as an uninterrupted one
            self.schedule.after_validation(valid.loss)
        if valid.loss < self.best_valid_loss:
            self.best_valid_loss = valid.loss
            self.save_best(valid.loss)
        self.save_last()
        self.log(
            f"| end of epoch {record['epoch']:3d} | time {seconds:6.1f}s | train loss {record['train_loss']:.3f} | "
            f"valid loss {valid.loss:.3f} | valid ppl {valid.ppl:9.2f} | lr {self.schedule.lr:.3g} | "
            f"{record['tokens_per_s']:,.0f} tok/s"
        )
        return stopped_by

    def _finish(self, stopped_by: str) -> TrainResult:
        train = self.config.train
        best_path = self.run_dir / ckpt.BEST_FILE
        tensors, metadata = ckpt.read_safetensors(best_path)
        ckpt.load_model_tensors(self.model, tensors, best_path)
        self.model.eval()
        test = evaluate(self.model, self.data.ids("test"), batch_size=train.eval_batch_size, bptt=train.bptt, context=train.eval_context)
        results = {"test": test.to_dict(self.config.tokenizer.level), "stopped_by": stopped_by,
                   "epochs_completed": self.epoch, "best_valid_loss": self.best_valid_loss}
        ckpt.atomic_write_json(self.run_dir / ckpt.RESULTS_FILE, results)
        bpc = f" | test bpc {test.bpc:.3f}" if self.config.tokenizer.level == "char" else ""
        self.log(f"| end of training | test loss {test.loss:.3f} | test ppl {test.ppl:9.2f}{bpc} | {test.tokens:,} tokens scored")
        return TrainResult(self.run_dir, self.epoch, self.best_valid_loss, test, stopped_by)
