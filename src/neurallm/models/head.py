"""The full-softmax output layer (features → log-probabilities over the vocabulary, and the loss), and the choice
between it and the adaptive softmax (:mod:`neurallm.models.adaptive`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.adaptive import AdaptiveSoftmaxHead, usable_cutoffs
from neurallm.models.chunked_softmax import bf16_weight_with_bias, linear_cross_entropy
from neurallm.models.contract import OutputHead


class SoftmaxHead(OutputHead):
    """A full softmax over the vocabulary.

    Args:
        in_features: size of the features it reads.
        vocab_size: number of tokens.
        tied_weight: the embedding weight to share (weight tying), or None for a weight of its own.
        bias: whether the logits get a bias of their own (``--no-output-bias``: none, as Hugging Face's models).
    """

    def __init__(self, in_features: int, vocab_size: int, tied_weight: nn.Parameter | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        if tied_weight is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, in_features).uniform_(-0.1, 0.1))
        else:
            self.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        # the weight and bias as the bfloat16 product takes them (bf16_weight_with_bias), with the versions they were
        # made from: an evaluation makes it once for all its windows; a training step makes a fresh one (see _weight_as)
        self._cast_weight: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._zero_bias: torch.Tensor | None = None

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight and bias in ``dtype`` (``(V, D + 2)``): under no_grad made again only after either has changed;
        with gradients on (a training step) made afresh every call."""
        bias = self._bias_or_zeros()
        if torch.is_grad_enabled():
            # the version counter cannot tell a training step whether the optimizer has moved the weights: PyTorch's
            # fused AdamW (cpu-fast's optimizer) updates them in place without bumping it (torch 2.13), and a copy
            # kept across its steps froze the output layer at its initial weights (training loss stuck near 8.6 on
            # wt2-lite where float32 reached 6.4 in 80 steps). A step casts once anyway, so caching saves nothing here.
            self._cast_weight = None
            return bf16_weight_with_bias(self.weight, bias, dtype)
        key = (self.weight.data_ptr(), self.weight._version, bias.data_ptr(), bias._version)
        if self._cast_weight is None or self._cast_weight[0] != key or self._cast_weight[1].dtype != dtype:
            self._cast_weight = (key, bf16_weight_with_bias(self.weight, bias, dtype))
        return self._cast_weight[1]

    def _bias_or_zeros(self) -> torch.Tensor:
        """The bias, or (``--no-output-bias``) zeros kept once, so the fused loss and its bfloat16 copy need no second
        route; nothing trains them."""
        if self.bias is not None:
            return self.bias
        if self._zero_bias is None or self._zero_bias.device != self.weight.device:
            self._zero_bias = self.weight.new_zeros(self.weight.size(0)).detach()
        return self._zero_bias

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(..., V)`` for features ``(..., D)``."""
        return F.log_softmax(self.logits(features).float(), dim=-1)

    def loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood in nats of ``targets`` (any shape) given ``features`` (same shape + D).

        On the CPU a mean or a sum goes through :func:`~neurallm.models.chunked_softmax.linear_cross_entropy`
        (the same value, without the full ``(N, V)`` logits in memory); accelerators have the bandwidth for the
        plain computation, which autocast and ``torch.compile`` understand.
        """
        if features.device.type == "cpu" and reduction != "none":
            flat = features.reshape(-1, features.size(-1))
            bias = self._bias_or_zeros()
            if not torch.is_autocast_enabled("cpu"):
                return linear_cross_entropy(flat, self.weight, bias, targets.reshape(-1), reduction)
            matmul_dtype = torch.get_autocast_dtype("cpu")
            return linear_cross_entropy(flat, self.weight, bias, targets.reshape(-1), reduction, matmul_dtype,
                                        self._weight_as(matmul_dtype))
        logits = self.logits(features).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def build_head(config: ModelConfig, in_features: int, tied_weight: nn.Parameter | None) -> OutputHead:
    """The output layer ``config`` asks for: an adaptive softmax with ``--adaptive-softmax``, else a full one.

    A vocabulary smaller than the first cutoff (a character corpus, say) has nothing to cluster: full softmax."""
    if config.adaptive_softmax and usable_cutoffs(config.cutoffs, config.vocab_size):
        return AdaptiveSoftmaxHead(in_features, config.vocab_size, config.cutoffs)
    return SoftmaxHead(in_features, config.vocab_size, tied_weight, bias=config.output_bias)
