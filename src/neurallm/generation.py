"""Sampling text from a trained model, one token at a time, carrying the state.

The prompt is run through the model once; then each new token is drawn from the model's probabilities
(its log-probabilities divided by the temperature, optionally cut to the top k tokens or the smallest set
whose probability reaches top p) and fed back with the cache the previous step left. What the cache holds is
the model's business (:meth:`~neurallm.models.contract.LanguageModel.start_generation`): an RNN's hidden
state, or the Transformer's keys and values of the last ``context`` positions in fixed-size buffers, so a new
token costs one token's projections and one attention row, not a re-run of the prefix. The last token drawn is
not fed back: nothing would read its features.

There is one route: :func:`stream_generation`. ``neurallm generate``, :meth:`neurallm.Run.generate`, the web
page's ``/api/generate``, the OpenAI-compatible ``/v1/completions`` and ONNX generation all draw their tokens
through it (ONNX through :func:`sample_next`), with the settings of :class:`neurallm.sampling.SamplingSettings`,
so the same prompt, settings and seed give the same text from every door. It yields each token with the text it
releases; stop strings end the text before them (text that may be the start of one is held back until it is
not), and a hook called after every token (a deadline, a client that left) can end it early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from neurallm.data.bpe import BPE
from neurallm.data.tokenizers import Detokenizer, TokenizerSettings, line_break_token, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.models.contract import LanguageModel
from neurallm.sampling import MAX_SEED, MAX_TOKENS, SamplingSettings  # noqa: F401  (MAX_*: re-exported for callers)
from neurallm.settings import split_settings


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


def ids_to_text(ids: list[int], vocab: Vocab, tokenizer: TokenizerSettings) -> str:
    """The text of token ids, as generation writes tokens (``<eos>`` a line break, words space-joined)."""
    detokenizer = Detokenizer(tokenizer.level, bpe=vocab.bpe)
    return "".join(detokenizer.piece(vocab.tokens[i]) for i in ids) + detokenizer.flush()


@dataclass
class TokenChoice:
    """One drawn token.

    Attributes:
        id: its vocabulary id.
        token: the vocabulary token.
        logprob: its natural-log probability under the model (before temperature, top-k and top-p).
        top: the ``top_logprobs`` most likely (id, log-probability) pairs at that step, most likely first.
        offset: where its text starts in the continuation, in characters.
    """

    id: int
    token: str
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclass
class Piece:
    """Text released by a generation: what ``token`` added (``None``: the held-back text at the end)."""

    text: str
    token: TokenChoice | None


class GenerationStream:
    """One generation, made as it is iterated: each step yields a :class:`Piece` (see :func:`stream_generation`).

    After the iteration, ``text`` is the continuation (the stop string excluded), ``choices`` the drawn tokens and
    ``finish_reason`` ``"length"`` (all tokens made), ``"stop"`` (a stop string appeared) or ``"stopped"`` (the
    ``should_stop`` hook said so). ``prompt_text`` is the prompt as the result's text begins with it.
    """

    def __init__(self, model: LanguageModel, vocab: Vocab, tokenizer: TokenizerSettings, prompt: str | list[int],
                 settings: SamplingSettings, *, stop: Sequence[str] = (), should_stop: Callable[[], bool] | None = None,
                 top_logprobs: int = 0) -> None:
        self.model, self.vocab, self.tokenizer, self.settings = model, vocab, tokenizer, settings
        self.stop = [s for s in stop if s]
        self.should_stop = should_stop
        self.top_logprobs = top_logprobs
        if isinstance(prompt, str):
            self.prompt_tokens = prompt_to_tokens(prompt, tokenizer, vocab.bpe)
            self.prompt_ids = vocab.encode(self.prompt_tokens)[0]
            self.prompt_text = prompt if self.prompt_tokens else ""
        else:
            bad = [i for i in prompt if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(vocab)]
            if bad:
                raise ConfigError(f"prompt token id {bad[0]!r} is not in the vocabulary (0..{len(vocab) - 1})")
            self.prompt_ids = list(prompt)
            self.prompt_tokens = [vocab.tokens[i] for i in prompt]
            self.prompt_text = ids_to_text(self.prompt_ids, vocab, tokenizer)
        self.prompt_unknown = [t for t in self.prompt_tokens if t not in vocab.index]
        self.text = ""
        self.choices: list[TokenChoice] = []
        self.finish_reason: str | None = None

    def _stop_at(self, produced: str, released: int) -> int | None:
        """Where the first stop string starts in ``produced`` (none can start in text already released)."""
        found = [i for i in (produced.find(s, max(0, released - len(s))) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self, produced: str) -> int:
        """Characters at the end of ``produced`` that may be the start of a stop string: not released yet."""
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(produced)), 0, -1)
                    if produced.endswith(s[:k])), default=0)

    @torch.no_grad()
    def __iter__(self) -> Iterator[Piece]:
        model, vocab, settings = self.model, self.vocab, self.settings
        model.eval()
        device = next(model.parameters()).device
        ids = self.prompt_ids or vocab.encode([line_break_token(self.tokenizer, vocab.bpe)])[0]
        # The cache never holds more positions than the prompt and the new tokens: a context beyond that changes
        # nothing, and is not allocated.
        context = min(settings.context or len(ids) + settings.tokens, len(ids) + settings.tokens)
        generator = torch.Generator().manual_seed(settings.seed)
        cache = model.start_generation(1, context, device)
        # feed the prompt in slices of `context`: a generation step takes at most the cache's capacity
        for first in range(0, len(ids), context):
            chunk = torch.tensor(ids[first : first + context], device=device).view(-1, 1)
            features, cache = model.generation_step(chunk, cache)
        detokenizer = detokenizer_after(self.prompt_text, self.tokenizer, vocab.bpe)
        produced, released = "", 0
        self.finish_reason = "length"
        for made in range(1, settings.tokens + 1):
            log_probs = model.head.log_probs(features[-1, 0])  # (V,)
            next_id = sample_next(log_probs, settings.temperature, settings.top_k, settings.top_p, generator)
            top = []
            if self.top_logprobs:
                values, top_ids = torch.topk(log_probs, min(self.top_logprobs, log_probs.numel()))
                top = list(zip(top_ids.tolist(), values.double().tolist()))
            choice = TokenChoice(next_id, vocab.tokens[next_id], float(log_probs[next_id]), top, len(produced))
            self.choices.append(choice)
            produced += detokenizer.piece(choice.token)
            stop_at = self._stop_at(produced, released) if self.stop else None
            if stop_at is not None:
                self.text, self.finish_reason = produced[:stop_at], "stop"
                yield Piece(produced[released:stop_at], choice)
                return
            ready = len(produced) - (self._held(produced) if self.stop else 0)
            yield Piece(produced[released:ready], choice)
            released = ready
            self.text = produced[:released]
            if self.should_stop is not None and self.should_stop():
                self.finish_reason = "stopped"
                break
            if made < settings.tokens:  # the last token is not fed back: nothing would read its features
                features, cache = model.generation_step(torch.tensor([[next_id]], device=device), cache)
        produced += detokenizer.flush()  # BPE bytes that never completed a character
        stop_at = self._stop_at(produced, released) if self.stop else None
        if stop_at is not None:
            self.finish_reason = "stop"
        self.text = produced[: len(produced) if stop_at is None else stop_at]
        if len(self.text) > released:
            yield Piece(self.text[released:], None)

    def result(self) -> GenerationResult:
        """The finished generation as a :class:`GenerationResult` (the prompt's text, then the continuation)."""
        return GenerationResult(self.prompt_text + self.text, [c.token for c in self.choices], self.prompt_tokens,
                                self.prompt_unknown)


def stream_generation(model: LanguageModel, vocab: Vocab, tokenizer: TokenizerSettings, prompt: str | list[int],
                      settings: SamplingSettings, *, stop: Sequence[str] = (),
                      should_stop: Callable[[], bool] | None = None, top_logprobs: int = 0) -> GenerationStream:
    """The one generation route: the CLI, :meth:`neurallm.Run.generate`, the page's endpoints and ``/v1/completions``
    all iterate this.

    Args:
        model: a trained model (put in eval mode here).
        vocab: its vocabulary.
        tokenizer: the run's tokenizer settings (a text prompt is tokenized as the training text was).
        prompt: text to continue (empty: the start of a line), or token ids.
        settings: the sampling settings; ``context`` None means the whole history (the caller resolves a run's
            default with :func:`neurallm.sampling.generation_context`).
        stop: strings that end the generation; neither they nor anything after them is part of the text, and text
            that may be the start of one is held back until it is not.
        should_stop: called after each token; True ends the generation (a deadline, a client that left).
        top_logprobs: also record this many most likely alternatives per step.

    Returns:
        A :class:`GenerationStream`: iterate it for the :class:`Piece` s, whose texts add up to its ``text``.
    """
    return GenerationStream(model, vocab, tokenizer, prompt, settings, stop=stop, should_stop=should_stop,
                            top_logprobs=top_logprobs)


def generate(model: LanguageModel, vocab: Vocab, tokenizer: TokenizerSettings, *, prompt: str = "",
             on_text: Callable[[str], None] | None = None, stop: Sequence[str] = (), **sampling) -> GenerationResult:
    """Sample after ``prompt`` and return the whole result (``sampling``: the fields of :class:`SamplingSettings`).

    ``on_text`` is called with the text as it is made: the prompt with the first token, then one piece per token;
    the pieces add up to the result's ``text``.
    """
    settings = sampling_settings(sampling)
    stream = stream_generation(model, vocab, tokenizer, prompt, settings, stop=stop)
    first = True
    for piece in stream:
        if on_text is not None:
            if first:  # only once the first token is drawn
                on_text(stream.prompt_text)
                first = False
            on_text(piece.text)
    return stream.result()


def sampling_settings(given: dict) -> SamplingSettings:
    """:class:`SamplingSettings` from keyword arguments, an unknown name refused with the known ones."""
    (fields,) = split_settings(given, SamplingSettings, what="generate")
    return SamplingSettings(**fields)


def continue_text(prompt: str, generated_tokens: list[str], tokenizer: TokenizerSettings, bpe: BPE | None = None) -> str:
    """The prompt followed by the generated tokens as text (what :func:`generate` returns as ``text``)."""
    prompt_text = prompt if prompt_to_tokens(prompt, tokenizer, bpe) else ""
    detokenizer = detokenizer_after(prompt_text, tokenizer, bpe)
    return prompt_text + "".join(detokenizer.piece(t) for t in generated_tokens) + detokenizer.flush()
