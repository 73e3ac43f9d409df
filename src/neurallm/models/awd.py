"""AWD-LSTM (Merity, Keskar & Socher, 2018): an LSTM language model with its regularisers, each switchable.

    ids ─► embedding dropout (--dropoute) ─► locked dropout (--dropouti)
        ─► LSTM layer 1 (DropConnect on W_hh, --wdrop) ─► locked dropout (--dropouth) ─► … ─► LSTM layer n
        ─► locked dropout (--dropout) ─► output head

Layer sizes: every layer is ``nhid`` wide except the last, which is ``emsize`` wide when ``--tied`` (so its
output meets the shared embedding matrix without a projection, as in the paper) and ``nhid`` otherwise.
The training call adds activation regularisation (``alpha``: the dropped last-layer output's mean square) and
temporal activation regularisation (``beta``: the mean square change of the undropped output between steps) to
:attr:`StepOutput.loss`; :attr:`StepOutput.nll` stays the plain NLL.
"""

from __future__ import annotations

import torch
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.contract import State, StepOutput
from neurallm.models.dropouts import LockedDropout, embedding_dropout
from neurallm.models.head import build_head
from neurallm.models.rnn import RecurrentLanguageModel
from neurallm.models.weight_drop import WeightDropLSTM


def layer_sizes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(input, hidden)`` of each LSTM layer: ``nhid`` wide, the last ``emsize`` wide when tied."""
    hidden = [config.nhid] * (config.nlayers - 1) + [config.emsize if config.tied else config.nhid]
    inputs = [config.emsize] + hidden[:-1]
    return list(zip(inputs, hidden))


class AWDLSTMLanguageModel(RecurrentLanguageModel):
    """The AWD-LSTM body (see the module docstring) with any :class:`OutputHead`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        self.layers = nn.ModuleList(WeightDropLSTM(i, h, config.wdrop) for i, h in layer_sizes(config))
        self.locked = LockedDropout()
        self.head = build_head(config, layer_sizes(config)[-1][1], self.encoder.weight if config.tied else None)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """``(h_1, c_1, …, h_n, c_n)``, each ``(1, B, size of layer i)`` (layers may differ in size)."""
        return tuple(torch.zeros(1, batch_size, h, device=device) for _, h in layer_sizes(self.config) for _ in range(2))

    def _run(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Dropped output, undropped output (both ``(T, B, D)``) and the new state."""
        c = self.config
        x = self.locked(embedding_dropout(self.encoder, ids, c.dropoute, self.training), c.dropouti)  # (T, B, emsize)
        new_state: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, (h, cell) = layer(x, (state[2 * i], state[2 * i + 1]))  # (T, B, size of layer i)
            new_state += [h, cell]
            raw = x
            if i < len(self.layers) - 1:
                x = self.locked(x, c.dropouth)
        return self.locked(raw, c.dropout), raw, tuple(new_state)

    def features(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        output, _, new_state = self._run(ids, state)
        return output, new_state

    def forward(self, ids: torch.Tensor, state: State, targets: torch.Tensor) -> StepOutput:
        """Mean NLL plus AR (``alpha``) and TAR (``beta``) in ``loss``; the NLL alone in ``nll``."""
        output, raw, new_state = self._run(ids, state)
        nll = self.head.loss(output, targets)
        loss = nll
        if self.config.alpha > 0:
            loss = loss + self.config.alpha * output.pow(2).mean()
        if self.config.beta > 0 and raw.size(0) > 1:
            loss = loss + self.config.beta * (raw[1:] - raw[:-1]).pow(2).mean()
        return StepOutput(loss=loss, nll=nll, state=new_state)
