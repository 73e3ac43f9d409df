"""Build the model a :class:`ModelConfig` describes."""

from __future__ import annotations

from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.awd import AWDLSTMLanguageModel
from neurallm.models.contract import LanguageModel
from neurallm.models.rnn import RNNLanguageModel
from neurallm.models.transformer import TransformerLanguageModel


def build_model(config: ModelConfig) -> LanguageModel:
    """A freshly initialised model for ``config`` (``config.vocab_size`` must be set)."""
    if config.vocab_size < 2:
        raise ValueError("ModelConfig.vocab_size must be set from the vocabulary before building a model")
    if config.model == "Transformer":
        return TransformerLanguageModel(config)
    if config.model == "AWD_LSTM":
        return AWDLSTMLanguageModel(config)
    return RNNLanguageModel(config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (elements, shared ones once, as ``parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters())
