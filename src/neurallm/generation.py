"""Sampling text from a trained model, one token at a time, carrying the state.

The prompt is run through the model once; then each new token is drawn from the model's probabilities
(softmax of the logits divided by the temperature, optionally cut to the top k tokens or the smallest set
whose probability reaches top p) and fed back with the state the previous step left. RNNs carry their
hidden state; the Transformer keeps its keys and values in the same memory it uses across training windows,
here as a cache bounded by ``context`` tokens, so a new token costs O(context) rather than a re-run of the
whole prefix.

Text is handed out as it is made (``on_text``), so the CLI streams it and Ctrl-C keeps what was made. One call
makes at most ``MAX_TOKENS`` tokens: the result keeps every token in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from neurallm.data.tokenizers import EOS, Detokenizer, TokenizerSettings, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError

MAX_TOKENS = 1_000_000
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


@dataclass
class GenerationResult:
    """Generated text and what happened to the prompt.

    Attributes:
        text: the prompt followed by the generated continuation (``<eos>`` written as a line break).
        generated_tokens: the sampled tokens only.
        prompt_tokens: the prompt's tokens as the model saw them.
        prompt_unknown: prompt tokens not in the vocabulary (replaced by ``<unk>``).
    """

    text: str
    generated_tokens: list[str]
    prompt_tokens: list[str]
    prompt_unknown: list[str]


def _check(tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int, context: int) -> None:
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")
    if tokens > MAX_TOKENS:
        raise ConfigError(f"--tokens must be at most {MAX_TOKENS:,} per call, got {tokens:,}; run again with another --seed for more")
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise ConfigError(f"--temperature must be 0 (greedy) or a positive finite number, got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**64-1, got {seed}")
    if context < 1:
        raise ConfigError(f"--context must be at least 1 token, got {context}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """Draw one token id from ``logits`` ``(V,)``."""
    if temperature == 0:
        return int(logits.argmax())
    # shift so the largest logit is 0 before dividing: a tiny temperature then gives 0 and -inf (greedy), not inf - inf
    logits = logits.float()
    logits = (logits - logits.max()) / temperature
    if top_k is not None and top_k < logits.numel():
        cutoff = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_probs, dim=0) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: nn.Module,
    vocab: Vocab,
    tokenizer: TokenizerSettings,
    *,
    prompt: str = "",
    tokens: int = 1000,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 1111,
    context: int = 512,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Sample ``tokens`` tokens after ``prompt``.

    Args:
        model: a trained model (put in eval mode here).
        vocab: the model's vocabulary.
        tokenizer: the run's tokenizer settings (the prompt is tokenized the same way as the training text).
        prompt: text to continue; empty starts at the beginning of a line.
        tokens: number of tokens (words or characters) to generate.
        temperature: divides the logits; 0 picks the most likely token every time.
        top_k: sample among the k most likely tokens only.
        top_p: sample among the most likely tokens whose probabilities add up to p.
        seed: the same seed gives the same text.
        context: Transformer cache length in tokens (RNNs carry their whole history in their state).
        on_text: called with each piece of the text as it is made (the prompt, then one piece per token);
            the pieces add up to the result's ``text``.
    """
    _check(tokens, temperature, top_k, top_p, seed, context)
    model.eval()
    device = next(model.parameters()).device
    prompt_tokens = [t for line in prompt.splitlines() for t in tokenize_line(line, tokenizer)]
    if prompt_tokens and not prompt.endswith("\n"):
        prompt_tokens = prompt_tokens[:-1]  # the prompt's last line is not finished: no end-of-line token
    unknown = [t for t in prompt_tokens if t not in vocab.index]
    start = prompt_tokens or ([EOS] if tokenizer.level == "word" else ["\n"])
    ids, _ = vocab.encode(start)

    prompt_text = prompt if prompt_tokens else ""
    # the first word is joined to the prompt by a space unless the prompt ends a line or a word already
    detokenizer = Detokenizer(tokenizer.level, after_word=bool(prompt_text) and not prompt_text.endswith(("\n", " ")))
    pieces = [prompt_text]
    emit = on_text or (lambda piece: None)
    emit(prompt_text)
    generator = torch.Generator().manual_seed(seed)
    state = model.init_state(1, device)
    forward_kwargs = {} if model.window_independent else {"keep": context}
    # feed the prompt in slices of `context` so a long prompt never builds an unbounded attention window
    step = max(1, context)
    for first in range(0, len(ids), step):
        chunk = torch.tensor(ids[first : first + step], device=device).view(-1, 1)
        features, state = model(chunk, state, **forward_kwargs)
    generated: list[int] = []
    for _ in range(tokens):
        logits = model.head.logits(features[-1, 0])
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        generated.append(next_id)
        pieces.append(detokenizer.piece(vocab.tokens[next_id]))
        emit(pieces[-1])
        features, state = model(torch.tensor([[next_id]], device=device), state, **forward_kwargs)
    return GenerationResult("".join(pieces), vocab.decode(generated), prompt_tokens, unknown)
