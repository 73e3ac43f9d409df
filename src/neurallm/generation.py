"""Sampling text from a trained model, one token at a time, carrying the state.

The prompt is run through the model once; then each new token is drawn from the model's probabilities
(its log-probabilities divided by the temperature, optionally cut to the top k tokens or the smallest set
whose probability reaches top p) and fed back with the cache the previous step left. What the cache holds is
the model's business (:meth:`~neurallm.models.contract.LanguageModel.start_generation`): an RNN's hidden
state, or the Transformer's keys and values of the last ``context`` positions in fixed-size buffers, so a new
token costs one token's projections and one attention row, not a re-run of the prefix. The last token drawn is
not fed back: nothing would read its features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from neurallm.data.bpe import BPE
from neurallm.data.tokenizers import Detokenizer, TokenizerSettings, line_break_token, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.models.contract import LanguageModel


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


# One call makes at most this many tokens: the result keeps every token in memory (the CLI streams them).
MAX_TOKENS = 1_000_000
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds


def _check(tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int) -> None:
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")
    if tokens > MAX_TOKENS:
        raise ConfigError(f"--tokens must be at most {MAX_TOKENS:,} per call, got {tokens:,}; run again with another --seed for more")
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise ConfigError(f"--temperature must be 0 (greedy) or a positive finite number, got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**64-1, got {seed}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """Draw one token id from ``logits`` ``(V,)`` (unnormalised, or log-probabilities: the same distribution)."""
    if temperature == 0:
        return int(logits.argmax())
    # shift so the largest logit is 0 before dividing: a tiny temperature then gives 0 and -inf (greedy), not inf - inf;
    # in float64, where a temperature down to 5e-324 is not 0 (in float32 1e-300 is, and 0 / 0 would be NaN)
    logits = logits.double()
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


def generate(
    model: LanguageModel,
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
        context: positions a Transformer token attends to, itself included (RNNs carry their whole history in
            their state).
        on_text: called with the text as it is made: the prompt with the first token, then one piece per token;
            the pieces add up to the result's ``text``.
    """
    prompt_tokens = prompt_to_tokens(prompt, tokenizer, vocab.bpe)
    prompt_text = prompt if prompt_tokens else ""
    detokenizer = detokenizer_after(prompt_text, tokenizer, vocab.bpe)
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)

    generated_tokens: list[str] = []
    for token in iter_generate(model, vocab, tokenizer, prompt=prompt, tokens=tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, context=context):
        if not generated_tokens:
            emit(prompt_text)  # only once the settings passed their checks (at the first token)
        generated_tokens.append(token)
        emit(detokenizer.piece(token))
    held_back = detokenizer.flush()  # BPE bytes that never completed a character
    if held_back:
        emit(held_back)
    unknown = [t for t in prompt_tokens if t not in vocab.index]
    return GenerationResult("".join(pieces), generated_tokens, prompt_tokens, unknown)


def prompt_to_tokens(prompt: str, tokenizer: TokenizerSettings, bpe: BPE | None = None) -> list[str]:
    """The prompt's tokens; an unfinished last line gets no end-of-line token."""
    if tokenizer.level == "bpe" and bpe is not None:
        # BPE encodes the text as it is: an unfinished line simply has no line break to encode
        return bpe.tokenizer.encode(prompt.lower() if tokenizer.lowercase else prompt, add_special_tokens=False).tokens
    prompt_tokens = [t for line in prompt.splitlines() for t in tokenize_line(line, tokenizer)]
    if prompt_tokens and not prompt.endswith("\n"):
        prompt_tokens = prompt_tokens[:-1]
    return prompt_tokens


def detokenizer_after(prompt_text: str, tokenizer: TokenizerSettings, bpe: BPE | None = None) -> Detokenizer:
    """A :class:`Detokenizer` for the tokens that follow ``prompt_text``: the first word is joined to the prompt
    by a space unless the prompt ends a line or a word already."""
    return Detokenizer(tokenizer.level, after_word=bool(prompt_text) and not prompt_text.endswith(("\n", " ")), bpe=bpe)


def continue_text(prompt: str, generated_tokens: list[str], tokenizer: TokenizerSettings, bpe: BPE | None = None) -> str:
    """The prompt followed by the generated tokens as text (what :func:`generate` returns as ``text``)."""
    prompt_text = prompt if prompt_to_tokens(prompt, tokenizer, bpe) else ""
    detokenizer = detokenizer_after(prompt_text, tokenizer, bpe)
    return prompt_text + "".join(detokenizer.piece(t) for t in generated_tokens) + detokenizer.flush()


@torch.no_grad()
def iter_generate(
    model: LanguageModel,
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
) -> Iterator[str]:
    """Yield the tokens :func:`generate` samples, each as soon as it is drawn (for streaming).

    Arguments as :func:`generate`. The caller may stop iterating at any time; no forward pass runs after the
    last token is drawn.
    """
    _check(tokens, temperature, top_k, top_p, seed)
    if context < 1:
        raise ConfigError(f"--context must be at least 1, got {context}")
    model.eval()
    device = next(model.parameters()).device
    prompt_tokens = prompt_to_tokens(prompt, tokenizer, vocab.bpe)
    start = prompt_tokens or [line_break_token(tokenizer, vocab.bpe)]
    ids, _ = vocab.encode(start)

    generator = torch.Generator().manual_seed(seed)
    cache = model.start_generation(1, context, device)
    # feed the prompt in slices of `context`: a generation step takes at most the cache's capacity
    for first in range(0, len(ids), context):
        chunk = torch.tensor(ids[first : first + context], device=device).view(-1, 1)
        features, cache = model.generation_step(chunk, cache)
    for produced in range(1, tokens + 1):
        next_id = sample_next(model.head.log_probs(features[-1, 0]), temperature, top_k, top_p, generator)
        yield vocab.tokens[next_id]
        if produced < tokens:  # the last token is not fed back: nothing would read its features
            features, cache = model.generation_step(torch.tensor([[next_id]], device=device), cache)
