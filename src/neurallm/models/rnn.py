"""Recurrent language models: embedding → RNN_TANH / RNN_RELU / LSTM / GRU → dropout → output layer.

The PyTorch example's ``RNNModel``, with the output layer kept apart (``self.head``) and the state passed
in and out explicitly so the caller decides when to carry it and when to start cold.
"""

from __future__ import annotations

import torch
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.head import SoftmaxHead

State = tuple[torch.Tensor, ...]


class RNNLanguageModel(nn.Module):
    """Word or character RNN language model (cuDNN kernels on GPU through ``nn.LSTM`` etc.)."""

    carries_state = True
    # Reading a text in one window or in many gives the same outputs: an RNN's state is all it carries.
    window_independent = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        rnn_dropout = config.dropout if config.nlayers > 1 else 0.0
        if config.model in ("LSTM", "GRU"):
            rnn_class = nn.LSTM if config.model == "LSTM" else nn.GRU
            self.rnn = rnn_class(config.emsize, config.nhid, config.nlayers, dropout=rnn_dropout)
        else:
            nonlinearity = "tanh" if config.model == "RNN_TANH" else "relu"
            self.rnn = nn.RNN(config.emsize, config.nhid, config.nlayers, nonlinearity=nonlinearity, dropout=rnn_dropout)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        self.head = SoftmaxHead(config.nhid, config.vocab_size, self.encoder.weight if config.tied else None)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """A cold (all-zero) state for ``batch_size`` columns."""
        shape = (self.config.nlayers, batch_size, self.config.nhid)
        n_tensors = 2 if self.config.model == "LSTM" else 1
        return tuple(torch.zeros(shape, device=device) for _ in range(n_tensors))

    def forward(self, input: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features ``(T, B, nhid)`` for ids ``(T, B)``, and the state after the last step."""
        emb = self.drop(self.encoder(input))  # (T, B, emsize)
        rnn_state = state if self.config.model == "LSTM" else state[0]
        output, rnn_state = self.rnn(emb, rnn_state)  # (T, B, nhid)
        new_state = tuple(rnn_state) if self.config.model == "LSTM" else (rnn_state,)
        return self.drop(output), new_state
