"""Dropouts: ``nn.Dropout`` with a cheaper mask on the CPU, and those of AWD-LSTM (Merity et al., 2018).

* :class:`Dropout`: ``nn.Dropout``'s distribution; on the CPU the mask comes from ``torch.rand`` (see its docstring).
* :class:`LockedDropout` (variational dropout, Gal & Ghahramani): one mask per sequence, the same at every time
  step, so a unit is dropped for a whole window rather than flickering from step to step.
* :func:`embedding_dropout`: drops whole words (rows of the embedding matrix), scaling the kept rows, so every
  occurrence of a dropped word in the window loses its embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Zero each element with probability ``p`` in training, scaling the rest by ``1 / (1 - p)``; ``nn.Dropout``.

    Why not ``nn.Dropout`` itself: on the CPU its mask comes from ``bernoulli_``, which draws one number at a time
    (measured here: 2.1 ms for the 140k features of one window of the PyTorch example's LSTM, 2 masks per training
    step), while ``torch.rand`` fills a buffer in vectorised blocks (0.6 ms). A unit kept when its uniform draw is
    at least ``p`` has the same distribution. Accelerators keep ``F.dropout``'s fused kernel.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be between 0 and 1, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return F.dropout(x, self.p, training=True)
        mask = (torch.rand(x.shape, device=x.device) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LockedDropout(nn.Module):
    """Dropout of ``(T, B, D)`` features with one mask ``(1, B, D)`` shared by all ``T`` steps."""

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p == 0.0:
            return x
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
        return x * mask


def embedding_dropout(embed: nn.Embedding, ids: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Embeddings of ``ids`` with whole rows of the embedding matrix dropped with probability ``p``."""
    weight = embed.weight
    if training and p > 0.0:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
        weight = weight * mask
    return F.embedding(ids, weight, embed.padding_idx)
