"""Recurrent language models: embedding → RNN_TANH / RNN_RELU / LSTM / GRU → dropout → output layer.

The PyTorch example's ``RNNModel``, with the output layer kept apart (``self.head``) and the state passed
in and out explicitly so the caller decides when to carry it and when to start cold.
"""

from __future__ import annotations

import torch
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.contract import EvalLayout, GenerationCache, LanguageModel, State
from neurallm.models.dropouts import Dropout
from neurallm.models.head import build_head

# History every scored token gets in exact evaluation. An LSTM's state forgets within a few hundred tokens,
# so 512 makes batch sizes 1..80 agree to well under 0.05% (measured in tests/test_evaluation.py).
DEFAULT_EVAL_CONTEXT = 512
# An RNN's outputs do not depend on where windows are cut, so evaluation may run longer windows than bptt (fewer
# Python steps). Beyond 64 steps nothing is gained (measured: valid split of wt2-lite, batch 40: 9.7 s at 64 and at
# 256), while the LSTM's workspace grows with the window (peak RSS 392 MB at 64, 451 MB at 256).
EVAL_WINDOW = 64


class RecurrentLanguageModel(LanguageModel):
    """What every recurrent model shares: the state is all it carries, so evaluation may cut windows anywhere and
    generation just carries the state."""

    @property
    def carries_state(self) -> bool:
        return True

    def eval_layout(self, bptt: int) -> EvalLayout:
        # reading a text in one window or in many gives the same outputs: the state is all an RNN carries
        return EvalLayout(carries_state=True, window=max(bptt, EVAL_WINDOW), align=None, default_context=DEFAULT_EVAL_CONTEXT)

    def start_generation(self, batch_size: int, context: int, device: torch.device | str = "cpu") -> GenerationCache:
        """The cold state; ``context`` does not apply (the state summarises the whole history)."""
        return GenerationCache(self.init_state(batch_size, device))

    def generation_step(self, ids: torch.Tensor, cache: GenerationCache) -> tuple[torch.Tensor, GenerationCache]:
        features, state = self.features(ids, cache.tensors)
        return features, GenerationCache(state, cache.length + ids.size(0))


class RNNLanguageModel(RecurrentLanguageModel):
    """Word or character RNN language model (cuDNN kernels on GPU through ``nn.LSTM`` etc.)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.drop = Dropout(config.dropout)
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        rnn_dropout = config.dropout if config.nlayers > 1 else 0.0
        if config.model in ("LSTM", "GRU"):
            rnn_class = nn.LSTM if config.model == "LSTM" else nn.GRU
            self.rnn = rnn_class(config.emsize, config.nhid, config.nlayers, dropout=rnn_dropout)
        else:
            nonlinearity = "tanh" if config.model == "RNN_TANH" else "relu"
            self.rnn = nn.RNN(config.emsize, config.nhid, config.nlayers, nonlinearity=nonlinearity, dropout=rnn_dropout)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        # tying with nhid != emsize: a projection nhid → emsize before the shared matrix (Press & Wolf's variant)
        self.project = nn.Linear(config.nhid, config.emsize, bias=False) if config.tied and config.nhid != config.emsize else None
        self.head = build_head(config, config.emsize if config.tied else config.nhid,
                               self.encoder.weight if config.tied else None)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """A cold (all-zero) state for ``batch_size`` columns: ``(h, c)`` for an LSTM, ``(h,)`` otherwise."""
        shape = (self.config.nlayers, batch_size, self.config.nhid)
        n_tensors = 2 if self.config.model == "LSTM" else 1
        return tuple(torch.zeros(shape, device=device) for _ in range(n_tensors))

    def features(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features ``(T, B, nhid)`` for ids ``(T, B)``, and the state after the last step."""
        emb = self.drop(self.encoder(ids))  # (T, B, emsize)
        rnn_state = state if self.config.model == "LSTM" else state[0]
        output, rnn_state = self.rnn(emb, rnn_state)  # (T, B, nhid)
        new_state = tuple(rnn_state) if self.config.model == "LSTM" else (rnn_state,)
        output = self.drop(output)
        return (self.project(output) if self.project is not None else output), new_state
