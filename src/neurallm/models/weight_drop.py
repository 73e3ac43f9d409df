"""Weight-dropped LSTM layer: DropConnect on the hidden-to-hidden weights (Wan et al.; AWD-LSTM's ``--wdrop``).

The reference code deletes ``weight_hh_l0`` from the ``nn.LSTM`` and re-assigns a dropped copy before every
call, which broke with several PyTorch releases (flattened cuDNN weights, ``_flat_weights`` caching). Here the
layer keeps its parameters untouched and runs through :func:`torch.func.functional_call` with the dropped
matrix passed in place of the parameter: the cuDNN/CPU kernels still run, gradients reach the raw weight, and
nothing about the module changes between calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class WeightDropLSTM(nn.Module):
    """One ``nn.LSTM`` layer whose ``weight_hh`` gets a fresh DropConnect mask per forward call in training.

    Args:
        input_size, hidden_size: as ``nn.LSTM``.
        weight_drop: probability of dropping each hidden-to-hidden weight (0: a plain LSTM).
    """

    def __init__(self, input_size: int, hidden_size: int, weight_drop: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size)
        self.weight_drop = weight_drop

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x`` ``(T, B, input)``, ``state`` ``(h, c)`` each ``(1, B, hidden)`` → output ``(T, B, hidden)``, state."""
        if not self.training or self.weight_drop == 0.0:
            return self.lstm(x, state)
        params = dict(self.lstm.named_parameters())
        params["weight_hh_l0"] = F.dropout(params["weight_hh_l0"], self.weight_drop, training=True)
        return functional_call(self.lstm, params, (x, state))
