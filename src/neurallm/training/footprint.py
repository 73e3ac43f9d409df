"""Will the model fit? The memory that training's parameters need, checked before any of it is allocated.

Why: a model too large for the machine otherwise fails inside PyTorch's allocator with a traceback, or, when each
tensor fits but all of them do not, is killed by the kernel's out-of-memory killer mid-run with nothing said. The
parameter count comes from building the model on the ``meta`` device (shapes only, no memory), so it is exact for
every architecture without a formula per model. Initialising meta tensors imports sympy (73 MB of resident memory
that a training run otherwise never needs), so a generous upper bound is tried first and only a model that might
not fit is counted exactly.
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


def check_model_fits(model: ModelConfig, train: TrainConfig, device: torch.device, meminfo: Path = MEMINFO) -> None:
    """Refuse, in one line naming the flags, a model whose parameters alone would not fit in memory."""
    available = available_bytes(device, meminfo)
    if available is None or 2 * training_bytes(parameter_bound(model), train.optimizer) < available:
        return
    parameters = parameter_count(model)
    needed = training_bytes(parameters, train.optimizer)
    if needed > available:
        raise ConfigError(
            f"the model has {parameters:,} parameters: training them with {train.optimizer} needs {format_size(needed)} "
            f"for weights, gradients and optimizer state, more than the {format_size(available)} free on {device}; choose a smaller "
            f"--nhid/--emsize/--nlayers, or a smaller vocabulary (--max-vocab, --min-freq)"
        )
