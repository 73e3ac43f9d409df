"""The adaptive softmax output layer (Grave et al., 2017): the frequent words in a full softmax, the rare ones in
clusters reached through the head.

On a 13.8k–33k word vocabulary the full softmax is most of an LSTM's CPU time; with cutoffs 2000,10000 most
positions only pay for a 2,000-way softmax plus a few cluster logits. Ids must be sorted by frequency (the
vocabulary is: it is built most-frequent first), so the head's words are the frequent ones.
"""

from __future__ import annotations

import torch
from torch import nn

from neurallm.models.contract import OutputHead

DIV_VALUE = 4.0  # each tail cluster's projection is 4x narrower than the one before (the paper's choice)


def usable_cutoffs(cutoffs: tuple[int, ...], vocab_size: int) -> list[int]:
    """The cutoffs below ``vocab_size`` (a small vocabulary keeps fewer clusters rather than failing)."""
    return [c for c in cutoffs if 0 < c < vocab_size]


class AdaptiveSoftmaxHead(OutputHead):
    """``nn.AdaptiveLogSoftmaxWithLoss`` behind the :class:`OutputHead` interface.

    Args:
        in_features: size of the features it reads.
        vocab_size: number of tokens.
        cutoffs: increasing ids where a new cluster starts; those >= ``vocab_size`` are dropped, and at least one
            must remain (:func:`neurallm.models.head.build_head` uses a full softmax when none does).
    """

    def __init__(self, in_features: int, vocab_size: int, cutoffs: tuple[int, ...]) -> None:
        super().__init__()
        kept = usable_cutoffs(cutoffs, vocab_size)
        if not kept:
            raise ValueError(f"no cutoff in {cutoffs} is below the vocabulary size {vocab_size}")
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(in_features, vocab_size, kept, div_value=DIV_VALUE)

    def loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        flat = features.reshape(-1, features.size(-1)).float()
        with torch.autocast(device_type=flat.device.type, enabled=False):
            target_log_probs = self.adaptive(flat, targets.reshape(-1)).output  # (N,) log p(target)
        nll = -target_log_probs
        if reduction == "mean":
            return nll.mean()
        if reduction == "sum":
            return nll.sum()
        if reduction == "none":
            return nll
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(-1, features.size(-1)).float()
        with torch.autocast(device_type=flat.device.type, enabled=False):
            out = self.adaptive.log_prob(flat)  # (N, V)
        return out.reshape(*features.shape[:-1], out.size(-1))
