"""The dropouts of AWD-LSTM (Merity et al., 2018) that differ from ``nn.Dropout``.

* :class:`LockedDropout` (variational dropout, Gal & Ghahramani): one mask per sequence, the same at every time
  step, so a unit is dropped for a whole window rather than flickering from step to step.
* :func:`embedding_dropout`: drops whole words (rows of the embedding matrix), scaling the kept rows, so every
  occurrence of a dropped word in the window loses its embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
