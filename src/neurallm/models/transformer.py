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

Generation is different: the weights no longer change, so each layer caches the keys (already rotated at
their absolute positions) and values of the last ``context`` positions in fixed-size ring buffers. A new
token projects only itself, writes its key and value over the oldest slot and attends to the buffer: its
cost does not grow with the history, and a token attends to at most ``context`` positions, itself included.

State layout: a tuple of nlayers tensors, each ``(B, m, emsize)``, with m = 0 for a cold start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurallm.config import ModelConfig
from neurallm.models.contract import EvalLayout, GenerationCache, LanguageModel, State
from neurallm.models.head import SoftmaxHead, build_head

# exact evaluation's least history per scored token (see neurallm.evaluation)
MIN_STATEFUL_EVAL_CONTEXT = 512


Rotary = tuple[torch.Tensor, torch.Tensor]


def rotary(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> Rotary:
    """Cosines and sines ``(T, head_dim/2)`` that rotate queries or keys at integer ``positions`` ``(T,)``."""
    half = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, device=positions.device, dtype=torch.float32) / half))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, half)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, table: Rotary) -> torch.Tensor:
    """Apply rotary position embedding to ``x`` ``(B, H, T, Dh)`` with the table of its T positions."""
    cos, sin = table
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    # in the table's precision, returned in x's: under bfloat16 autocast queries, keys and values then share a
    # dtype, as attention with a lower-right causal mask requires (autocast does not cast for that path)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.nhead = config.nhead
        self.qkv = nn.Linear(config.emsize, 3 * config.emsize)
        self.proj = nn.Linear(config.emsize, config.emsize)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, memory: torch.Tensor, table: Rotary, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from the window ``x`` ``(B, T, C)`` to the memory ``(B, m, C)`` and the window; ``table``
        rotates positions 0..m+T-1. Returns the output and the last ``keep`` positions as the next memory."""
        B, T, C = x.size()
        m = memory.size(1)
        context = torch.cat((memory, x), dim=1) if m else x  # (B, m+T, C)
        w_q, w_kv = self.qkv.weight.split((C, 2 * C))
        b_q, b_kv = self.qkv.bias.split((C, 2 * C))
        q = F.linear(x, w_q, b_q).view(B, T, self.nhead, C // self.nhead).transpose(1, 2)  # (B, H, T, Dh)
        kv = F.linear(context, w_kv, b_kv).view(B, m + T, 2, self.nhead, C // self.nhead)
        k_all, v_all = kv.permute(2, 0, 3, 1, 4)  # 2 × (B, H, m+T, Dh)
        cos, sin = table
        q_rot, k_rot = rotate(q, (cos[m:], sin[m:])), rotate(k_all, table)
        dropout_p = self.dropout if self.training else 0.0
        if m == 0:
            y = F.scaled_dot_product_attention(q_rot, k_rot, v_all, is_causal=True, dropout_p=dropout_p)
        else:
            # query i sits at position m+i and may see every key up to and including that position: a causal
            # mask aligned to the lower-right corner. Said that way rather than as a dense (T, m+T) boolean mask,
            # SDPA can pick the flash / memory-efficient kernels on a GPU (a dense mask rules flash out).
            # (imported here: torch.nn.attention.bias pulls in torch._dynamo, 2 s and ~70 MB for every model)
            from torch.nn.attention.bias import causal_lower_right

            allowed = causal_lower_right(T, m + T)
            y = F.scaled_dot_product_attention(q_rot, k_rot, v_all, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        # the last `keep` positions, written as a slice from the end so that an exported (traced) graph keeps it
        # relative to the dynamic length m+T rather than baking in the start it had when traced
        return self.proj(y), (context[:, -keep:] if keep else context[:, :0])

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, table: Rotary) -> torch.Tensor:
        """Generation: attend from ``x`` ``(B, T, C)`` at positions ``length..length+T-1`` to the cached ring
        buffers ``keys``/``values`` ``(B, H, capacity, Dh)`` and to itself, then write its keys and values into
        the buffers (slot = position mod capacity). Every query sees at most ``capacity`` positions."""
        B, T, C = x.size()
        capacity = keys.size(2)
        q, k, v = self.qkv(x).view(B, T, 3, self.nhead, C // self.nhead).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        q, k = rotate(q, table), rotate(k, table)
        new_positions = torch.arange(length, length + T, device=x.device)
        slots = new_positions % capacity
        if T == 1:
            # the new key overwrites the one position that falls out of reach: no mask needed
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
            filled = min(length + 1, capacity)
            y = F.scaled_dot_product_attention(q, keys[:, :, :filled], values[:, :, :filled])
        else:
            filled = min(length, capacity)
            held = torch.arange(filled, device=x.device)
            held = held + capacity * ((length - 1 - held) // capacity)  # absolute position in each filled slot
            key_positions = torch.cat((held, new_positions))
            allowed = (key_positions[None, :] <= new_positions[:, None]) & (key_positions[None, :] > new_positions[:, None] - capacity)
            y = F.scaled_dot_product_attention(
                q, torch.cat((keys[:, :, :filled], k), dim=2), torch.cat((values[:, :, :filled], v), dim=2), attn_mask=allowed
            )
            keys.index_copy_(2, slots, k)
            values.index_copy_(2, slots, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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

    def forward(self, x: torch.Tensor, memory: torch.Tensor, table: Rotary, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        attended, new_memory = self.attn(self.ln_attn(x), memory, table, keep)
        return self._feed_forward(x + self.drop(attended)), new_memory

    def decode(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, table: Rotary) -> torch.Tensor:
        return self._feed_forward(x + self.attn.decode(self.ln_attn(x), keys, values, length, table))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class TransformerLanguageModel(LanguageModel):
    """Causal Transformer LM over ``(T, B)`` ids; with ``memory > 0`` it carries state across windows."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Embedding(config.vocab_size, config.emsize)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.nlayers))
        self.ln_final = nn.LayerNorm(config.emsize)
        nn.init.normal_(self.encoder.weight, std=0.02)
        self.head = build_head(config, config.emsize, self.encoder.weight if config.tied else None)
        if isinstance(self.head, SoftmaxHead) and not config.tied:
            nn.init.normal_(self.head.weight, std=0.02)
        self._rotary_cache: Rotary | None = None  # see _rotary_input

    @property
    def carries_state(self) -> bool:
        return self.config.memory > 0

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Empty memory (length 0) for every layer."""
        empty = torch.zeros(batch_size, 0, self.config.emsize, device=device)
        return tuple(empty for _ in range(self.config.nlayers))

    def features(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Features ``(T, B, emsize)`` for ids ``(T, B)``; the state is each layer's memory (see the module docstring)."""
        x = self.drop(self.encoder(ids.t()))  # (B, T, C)
        m = state[0].size(1)
        if torch.compiler.is_compiling():
            table = self._rotary_input(m + x.size(1), x.device, x.dtype)
        else:  # computed from the traced sizes, so that an exported graph takes windows of any length
            table = rotary(torch.arange(m + x.size(1), device=x.device), self.config.emsize // self.config.nhead, x.dtype)
        new_state: list[torch.Tensor] = []
        for block, memory in zip(self.blocks, state):
            x, memory = block(x, memory, table, self.config.memory)
            new_state.append(memory)
        features = self.ln_final(x).transpose(0, 1)  # (T, B, C)
        return features, tuple(new_state)

    def prepare_for_compile(self) -> None:
        """The rotary table becomes an input of the compiled graph rather than a part of it.

        Why: Inductor inlines the table's sines, cosines and powers into every kernel that rotates a query or a
        key, for every element: on an H100 those kernels took 20% of a GPT-2-small step. (Done here, not with a
        decorator: ``torch.compiler.disable`` imports torch._dynamo, 2 s and ~70 MB for every model.)
        """
        self._rotary_input = torch.compiler.disable(self._rotary_input)

    def _rotary_input(self, positions: int, device: torch.device, dtype: torch.dtype) -> Rotary:
        """The rotary table of positions 0..positions-1, kept between steps (a window and its memory span the
        same positions every time); run outside the compiled graph after :meth:`prepare_for_compile`."""
        cached = self._rotary_cache
        if cached is None or cached[0].size(0) != positions or cached[0].device != device or cached[0].dtype != dtype:
            cached = rotary(torch.arange(positions, device=device), self.config.emsize // self.config.nhead, dtype)
            self._rotary_cache = cached
        return cached

    def eval_layout(self, bptt: int) -> EvalLayout:
        if not self.carries_state:
            # nothing carried: sliding windows of the training length, each with bptt/2 tokens of history
            return EvalLayout(carries_state=False, window=bptt, align=None, default_context=bptt // 2)
        # What a window sees depends on where it starts, so columns are cut into batch size 1's windows; a layer
        # sees at most memory + bptt positions back, so nlayers times that reproduces batch size 1 exactly.
        context = max(MIN_STATEFUL_EVAL_CONTEXT, self.config.nlayers * (self.config.memory + bptt))
        return EvalLayout(carries_state=True, window=bptt, align=bptt, default_context=context)

    def start_generation(self, batch_size: int, context: int, device: torch.device | str = "cpu") -> GenerationCache:
        """Empty key and value ring buffers of ``context`` positions per layer."""
        head_dim = self.config.emsize // self.config.nhead
        shape = (batch_size, self.config.nhead, context, head_dim)
        buffers = tuple(torch.zeros(shape, device=device) for _ in range(2 * self.config.nlayers))
        return GenerationCache(buffers, 0, context)

    def generation_step(self, ids: torch.Tensor, cache: GenerationCache) -> tuple[torch.Tensor, GenerationCache]:
        T = ids.size(0)
        if cache.capacity is None or T > cache.capacity:
            raise ValueError(f"a generation step takes at most the cache's {cache.capacity} positions, got {T}")
        x = self.encoder(ids.t())  # (B, T, C)
        positions = torch.arange(cache.length, cache.length + T, device=x.device)
        table = rotary(positions, self.config.emsize // self.config.nhead, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache.tensors[2 * i], cache.tensors[2 * i + 1], cache.length, table)
        features = self.ln_final(x).transpose(0, 1)  # (T, B, C)
        return features, GenerationCache(cache.tensors, cache.length + T, cache.capacity)
