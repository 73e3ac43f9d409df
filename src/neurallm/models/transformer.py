"""A decoder-only Transformer language model with optional Transformer-XL style memory.

Positions are rotary (RoPE): a query at position i and a key at position j interact through i - j only.
That is what lets a window attend to the memory of the previous one: the positions of a window and its
memory are numbered 0..m+T-1 afresh each time, and since only differences matter they mean the same thing
in every window, for every batch size.

Memory (``--memory M``): as in Transformer-XL, each layer keeps its (normalised) input at the last M positions
it saw, detached so that gradients stop at the window edge as in truncated BPTT. The next window projects
that memory to keys and values with the *current* weights and its queries attend to them as well as to the
window itself. (Caching keys and values instead is cheaper, but they then come from the previous step's
weights and the key/value projections learn nothing from the memory positions; measured on wt2-lite, that
variant trained to a worse perplexity than no memory at all.) The memory is carried exactly like an RNN
state, so training with contiguous batches and evaluation pass information from one window to the next.
Generation uses the same memory as its cache, bounded by ``context`` positions: a new token costs O(context)
(one key/value projection and one attention row per cached position), not a re-run of the whole prefix.

State layout: a tuple of nlayers tensors, each ``(B, m, emsize)``, with m = 0 for a cold start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.head import SoftmaxHead

State = tuple[torch.Tensor, ...]


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Apply rotary position embedding to ``x`` ``(B, H, T, Dh)`` at integer ``positions`` ``(T,)``."""
    half = x.size(-1) // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.nhead = config.nhead
        self.qkv = nn.Linear(config.emsize, 3 * config.emsize)
        self.proj = nn.Linear(config.emsize, config.emsize)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.size()
        m = memory.size(1)
        context = torch.cat((memory, x), dim=1)  # (B, m+T, C)
        w_q, w_kv = self.qkv.weight.split((C, 2 * C))
        b_q, b_kv = self.qkv.bias.split((C, 2 * C))
        q = F.linear(x, w_q, b_q).view(B, T, self.nhead, C // self.nhead).transpose(1, 2)  # (B, H, T, Dh)
        kv = F.linear(context, w_kv, b_kv).view(B, m + T, 2, self.nhead, C // self.nhead)
        k_all, v_all = kv.permute(2, 0, 3, 1, 4)  # 2 × (B, H, m+T, Dh)
        positions = torch.arange(m + T, device=x.device)
        q_rot, k_rot = rotate(q, positions[m:]), rotate(k_all, positions)
        dropout_p = self.dropout if self.training else 0.0
        if m == 0:
            y = F.scaled_dot_product_attention(q_rot, k_rot, v_all, is_causal=True, dropout_p=dropout_p)
        else:
            # query i sits at position m+i and may see every key up to and including that position
            allowed = torch.ones(T, m + T, dtype=torch.bool, device=x.device).tril(diagonal=m)
            y = F.scaled_dot_product_attention(q_rot, k_rot, v_all, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), context[:, max(0, m + T - keep) :]


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention then a GELU feed-forward, each with a residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.emsize)
        self.attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(config.emsize)
        self.ffn = nn.Sequential(
            nn.Linear(config.emsize, config.nhid), nn.GELU(), nn.Linear(config.nhid, config.emsize)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, memory, keep):
        attended, new_memory = self.attn(self.ln_attn(x), memory, keep)
        x = x + self.drop(attended)
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x, new_memory


class TransformerLanguageModel(nn.Module):
    """Causal Transformer LM over ``(T, B)`` ids; with ``memory > 0`` it carries state across windows."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.nlayers))
        self.ln_final = nn.LayerNorm(config.emsize)
        nn.init.normal_(self.encoder.weight, std=0.02)
        self.head = SoftmaxHead(config.emsize, config.vocab_size, self.encoder.weight if config.tied else None)
        if not config.tied:
            nn.init.normal_(self.head.weight, std=0.02)

    # What a window sees depends on where it starts (its memory holds at most `memory` positions).
    window_independent = False

    @property
    def carries_state(self) -> bool:
        return self.config.memory > 0

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Empty memory (length 0) for every layer."""
        empty = torch.zeros(batch_size, 0, self.config.emsize, device=device)
        return tuple(empty for _ in range(self.config.nlayers))

    def forward(self, input: torch.Tensor, state: State, keep: int | None = None) -> tuple[torch.Tensor, State]:
        """Features ``(T, B, emsize)`` for ids ``(T, B)``.

        Args:
            input: ids ``(T, B)``.
            state: the memory from :meth:`init_state` or the previous call.
            keep: positions of memory to return per layer (default: the model's ``memory``; generation passes
                its context length to use the memory as a KV cache).
        """
        keep = self.config.memory if keep is None else keep
        x = self.drop(self.encoder(input.t()))  # (B, T, C)
        new_state: list[torch.Tensor] = []
        for block, memory in zip(self.blocks, state):
            x, memory = block(x, memory, keep)
            new_state.append(memory)
        features = self.ln_final(x).transpose(0, 1)  # (T, B, C)
        return features, tuple(new_state)
