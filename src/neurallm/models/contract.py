"""The model contract: what the trainer, evaluation and generation may ask of a language model, and nothing else.

Every language model in neurallm subclasses :class:`LanguageModel`. The code around models depends only on
the members defined here, never on a model's configuration or internals, so that

* a wrapper can stand in for the model where the loss is computed: ``model(ids, state, targets)`` is the one
  call that DistributedDataParallel, ``torch.compile`` and autocast see (the trainer keeps the unwrapped model
  in a separate variable for everything else: ``init_state``, ``eval_layout``, checkpoints);
* the output layer is a swappable :class:`OutputHead` (a full softmax today, an adaptive softmax next):
  training reaches it through ``forward``, evaluation through ``head.loss`` on the positions it scores, and
  generation through ``head.log_probs``;
* evaluation learns how it must run a model from :meth:`LanguageModel.eval_layout`, and generation carries a
  :class:`GenerationCache` it never looks inside.

Shapes are time-major as in the PyTorch example: ids and targets ``(T, B)``, features ``(T, B, D)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, ...]
"""What a model carries from one window to the next (an RNN's hidden state, a Transformer-XL memory)."""


class OutputHead(nn.Module, ABC):
    """The output layer: features ``(..., D)`` to a distribution over the vocabulary."""

    @abstractmethod
    def loss(self, features: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood in nats of ``targets`` ``(...)`` given ``features`` ``(..., D)``.

        Args:
            features: the model's features.
            targets: token ids, the shape of ``features`` without its last dimension.
            reduction: ``mean`` (a scalar), ``sum`` (a scalar) or ``none`` (one value per target, flattened).

        The arithmetic is float32 whatever the features' dtype (autocast included), so losses compare across runs.
        """

    @abstractmethod
    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Float32 log-probabilities ``(..., V)`` for features ``(..., D)`` (sampling, cache pointers)."""


@dataclass(frozen=True)
class StepOutput:
    """What one forward call over a training window returns.

    Attributes:
        loss: what ``backward`` is called on: the mean NLL plus any regulariser the model adds (AR/TAR, say).
        nll: the mean NLL alone (nats per target), for logging and the non-finite check.
        state: the state after the window's last step (not detached; the trainer detaches it).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    state: State


@dataclass(frozen=True)
class EvalLayout:
    """How exact evaluation must run a model so that every batch size gives the same result.

    Attributes:
        carries_state: the model passes a state between windows; if False, evaluation uses sliding windows.
        window: positions per model call. A stateful model whose outputs do not depend on where windows are cut
            (an RNN) may use long windows; one whose outputs do (the Transformer with memory) uses its ``bptt``.
        align: if set, columns start at multiples of it, so every column is cut into the same windows as batch
            size 1 (needed when outputs depend on where windows start); None when they do not.
        default_context: tokens of history each scored token gets when ``--context`` is not given.
    """

    carries_state: bool
    window: int
    align: int | None
    default_context: int


@dataclass(frozen=True)
class GenerationCache:
    """What a model carries from one generation step to the next; generation never looks inside.

    Attributes:
        tensors: an RNN's state; for the Transformer one key and one value buffer per layer, each of a fixed
            size ``(B, H, capacity, Dh)`` (fixed so that compiled and exported decoders see static shapes).
        length: tokens fed so far.
        capacity: positions the buffers hold (None: the state summarises all history, as an RNN's does).
    """

    tensors: State
    length: int = 0
    capacity: int | None = None


class LanguageModel(nn.Module, ABC):
    """Base class of every neurallm language model (see the module docstring for who calls what)."""

    head: OutputHead

    @property
    @abstractmethod
    def carries_state(self) -> bool:
        """Whether the state a window leaves is meaningful for the next window."""

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """A cold state for ``batch_size`` columns."""

    @abstractmethod
    def features(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features ``(T, B, D)`` for ids ``(T, B)``, and the state after the last step."""

    def forward(self, ids: torch.Tensor, state: State, targets: torch.Tensor) -> StepOutput:
        """The training call: mean NLL of ``targets`` ``(T, B)`` after ``ids`` ``(T, B)`` (no regulariser here;
        a model that adds one overrides this)."""
        features, new_state = self.features(ids, state)
        nll = self.head.loss(features, targets)
        return StepOutput(loss=nll, nll=nll, state=new_state)

    def prepare_for_compile(self) -> None:
        """Called once before ``torch.compile`` sees the model (or a wrapper of it), for work that the compiled
        graph should take as an input rather than recompute. The result never depends on it: a model compiled
        without this call computes the same values, only more slowly."""

    @abstractmethod
    def eval_layout(self, bptt: int) -> EvalLayout:
        """How exact evaluation runs this model when it was trained with windows of ``bptt`` tokens."""

    @abstractmethod
    def start_generation(self, batch_size: int, context: int, device: torch.device | str = "cpu") -> GenerationCache:
        """An empty cache for sampling ``batch_size`` sequences that attend to at most ``context`` positions."""

    @abstractmethod
    def generation_step(self, ids: torch.Tensor, cache: GenerationCache) -> tuple[torch.Tensor, GenerationCache]:
        """Features ``(T, B, D)`` of the next ``T`` ids ``(T, B)`` and the cache that follows them.

        ``T`` may be more than one (a prompt) but at most the cache's capacity. The cache passed in must not be
        used again: its buffers may be updated in place.
        """
