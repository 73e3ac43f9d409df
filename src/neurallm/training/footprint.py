"""Will the model fit? The memory that training's parameters need, checked before any of it is allocated.

Why: a model too large for the machine otherwise fails inside PyTorch's allocator with a traceback, or, when each
tensor fits but all of them do not, is killed by the kernel's out-of-memory killer mid-run with nothing said. The
parameter count comes from building the model on the ``meta`` device (shapes only, no memory), so it is exact for
every architecture without a formula per model. Initialising meta tensors imports sympy (73 MB of resident memory
that a training run otherwise never needs), so a generous upper bound is tried first and only a model that might
not fit is counted exactly.

Activations count too: a Transformer's attention holds a ``(T, memory + T)`` score matrix per head and layer for
the backward pass, so ``--bptt 100000 --batch-size 1`` wanted 80 GB of scores and failed after allocating 5.4 GB,
leaving a half-made run. :func:`activation_bytes` estimates what one training step keeps for the backward pass
(float32; a slight underestimate on purpose, so that only settings that cannot fit are refused); the check runs
when the Trainer is built, before the run folder is claimed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neurallm.config import OPTIMIZER_STATE_COPIES, ModelConfig, TrainConfig
from neurallm.errors import ConfigError
from neurallm.fileio import format_size
from neurallm.models import build_model, count_parameters

MEMINFO = Path("/proc/meminfo")
# float32 copies of the parameters that training holds: the weights and their gradients, plus the optimizer's own


def parameter_count(config: ModelConfig) -> int:
    """Exact number of parameters of the model ``config`` describes, without allocating them."""
    with torch.device("meta"):
        return count_parameters(build_model(config))


def parameter_bound(config: ModelConfig) -> int:
    """At least the number of parameters: the embedding and the output layer (``V × width`` each) and, per layer,
    12 square matrices of the widest size (an LSTM has 8, a GRU 6, a Transformer layer 4 + 2·nhid/emsize)."""
    width = max(config.emsize, config.nhid)
    return 2 * config.vocab_size * width + config.nlayers * 12 * width * width + 16 * width * (config.nlayers + 1)


def training_bytes(parameters: int, optimizer: str) -> int:
    """Bytes of parameter-sized float32 state during training (activations and data come on top)."""
    return parameters * 4 * (2 + OPTIMIZER_STATE_COPIES[optimizer])


def available_bytes(device: torch.device, meminfo: Path = MEMINFO) -> int | None:
    """Memory the run can still take on ``device`` (None where it cannot be read: then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu" or not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def activation_bytes(model: ModelConfig, train: TrainConfig, device: torch.device, train_tokens: int | None = None) -> int:
    """Bytes one training step keeps for its backward pass (float32): per token and layer, the layer's
    intermediate values and, for a Transformer whose attention scores are materialised (PyTorch's math kernel, which
    training with dropout uses on the CPU), ``nhead × (memory + bptt)`` scores, their softmax and dropout; on an
    accelerator, the logits over the vocabulary (the CPU head computes its loss in slices). ``train_tokens``
    (the train split's length) caps the window: a step never holds more tokens than the data has (settings that
    ask for more are refused by the batching check, which names them)."""
    bptt, batch_size = train.bptt, train.batch_size
    if train_tokens is not None:
        batch_size = max(1, min(batch_size, train_tokens))
        bptt = max(1, min(bptt, train_tokens // batch_size))
    tokens = batch_size * bptt
    if model.model == "Transformer":
        per_layer = 12 * model.emsize + 3 * model.nhid
        if device.type == "cpu":
            per_layer += 3 * model.nhead * (model.memory + bptt)
    else:
        per_layer = 8 * max(model.emsize, model.nhid)
    per_token = model.nlayers * per_layer + 2 * model.emsize + (3 * model.vocab_size if device.type != "cpu" else 0)
    return tokens * per_token * 4


def check_model_fits(model: ModelConfig, train: TrainConfig, device: torch.device, meminfo: Path = MEMINFO,
                     train_tokens: int | None = None) -> None:
    """Refuse, in one line naming the flags, a model whose parameters and one step's activations would not fit in
    memory (before anything is allocated); ``train_tokens`` as :func:`activation_bytes`."""
    available = available_bytes(device, meminfo)
    activations = activation_bytes(model, train, device, train_tokens)
    if available is None or 2 * (training_bytes(parameter_bound(model), train.optimizer) + activations) < available:
        return
    parameters = parameter_count(model)
    needed = training_bytes(parameters, train.optimizer)
    if needed > available:
        raise ConfigError(
            f"the model has {parameters:,} parameters: training them with {train.optimizer} needs {format_size(needed)} "
            f"for weights, gradients and optimizer state, more than the {format_size(available)} free on {device}; choose a smaller "
            f"--nhid/--emsize/--nlayers, or a smaller vocabulary (--max-vocab, --min-freq)"
        )
    if needed + activations > available:
        attention = " (attention scores grow with --bptt squared)" if model.model == "Transformer" else ""
        raise ConfigError(
            f"one training step of --batch-size {train.batch_size} × --bptt {train.bptt} needs about "
            f"{format_size(activations)} of activations{attention} beside {format_size(needed)} of weights and optimizer "
            f"state, more than the {format_size(available)} free on {device}; choose a smaller --bptt or --batch-size"
        )
