"""Tokens per second and model FLOPs utilisation (MFU): how much of the device's arithmetic a run uses.

MFU = achieved model FLOP/s ÷ the device's peak. The model FLOPs of a Transformer are counted as in PaLM
(appendix B) and nanoGPT: 6 FLOPs per weight per token for forward and backward of the matrix multiplies
(2 forward, 4 backward), plus the attention scores and their weighted sums, ``12 · layers · width · keys``
per token, where ``keys`` = ``--memory + --bptt`` positions attended to. The embedding lookup costs no
multiplies, so an untied embedding's weights are left out (a tied one is counted once, as the output layer).

The peak is the device's own dense bf16 tensor throughput, looked up by its name (:data:`BF16_PEAK_TFLOPS`);
a device not in the table reports no MFU rather than a figure measured against some other GPU.
"""

from __future__ import annotations

import torch

from neurallm.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s. Matched against
# torch.cuda.get_device_name() in this order: a more specific name comes before a name it contains.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not a GPU in :data:`BF16_PEAK_TFLOPS`."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the GPU called ``name``, or None if unknown."""
    for part, tflops in BF16_PEAK_TFLOPS:
        if part in name:
            return tflops * 1e12
    return None


def transformer_flops_per_token(config: ModelConfig, bptt: int, n_params: int) -> float:
    """Training FLOPs (forward + backward) per token of a Transformer with ``n_params`` weights in all."""
    embedding = 0 if config.tied else config.vocab_size * config.emsize
    keys = config.memory + bptt
    return 6.0 * (n_params - embedding) + 12.0 * config.nlayers * config.emsize * keys


def model_flops_per_token(config: ModelConfig, bptt: int, n_params: int) -> float | None:
    """FLOPs per trained token for MFU: Transformers only (an RNN's MFU is not reported)."""
    if config.model != "Transformer":
        return None
    return transformer_flops_per_token(config, bptt, n_params)


def mfu(tokens_per_s: float, flops_per_token: float | None, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] of ``devices`` devices together, or None when a figure is unknown."""
    if flops_per_token is None or peak_flops is None:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * devices)
