"""OpenAI- and vLLM-compatible endpoints on ``neurallm serve``, so that every OpenAI client, and
lm-evaluation-harness's ``local-completions`` model, can use a neurallm run.

::

    GET  /v1/models            the run as the one model; its id is the run folder's name
    POST /v1/completions       prompt (text, texts, token ids, lists of token ids), max_tokens, temperature, top_p,
                               top_k (an extension), seed, stop, n, stream (SSE, then `data: [DONE]`), echo,
                               logprobs (tokens, token_logprobs, top_logprobs, text_offset), usage
    POST /v1/chat/completions  400: a base model has no chat template (use /v1/completions)
    POST /tokenize             {prompt} -> {tokens, count, max_model_len} (vLLM's)
    POST /detokenize           {tokens} -> {prompt}
    GET  /tokenizer_info       {eos_token, ...}: what lm-evaluation-harness needs to tokenize with the server

Choices made where the OpenAI API leaves room (docs/guides/serving.md says them to users):

* One model: any ``model`` a client sends is accepted and answered as the run (the answer's ``model`` names it).
* Any API key is accepted unless ``--api-key`` is given; then a missing or wrong key gets 401.
* The log-probabilities are the model's own (before temperature, top-k and top-p), natural logs. With ``echo`` the
  prompt's are :func:`neurallm.scoring.score_ids`' (``neurallm score``'s rules: the first token is read after a
  line break, the state is carried, an unknown word is scored as ``<unk>``), except that the first token's is
  ``null``, as OpenAI's are. ``max_tokens: 0`` with ``echo`` scores a prompt without generating.
* ``max_tokens`` defaults to ``neurallm generate``'s default, capped by ``--max-tokens``; without a ``seed``
  every choice gets a fresh random one, with a ``seed`` choice ``i`` uses ``seed + i`` (choice 0 is then what
  ``neurallm generate --seed SEED`` writes).
* The end of a line (``<eos>`` at word level) is written ``"\\n"``; ``eos_token`` is ``"\\n"`` for that reason, and
  generation does not stop there unless ``"\\n"`` is a ``stop`` string.
"""

# No `from __future__ import annotations`: FastAPI reads the request classes' annotations at run time.

import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from neurallm.api import Run
from neurallm.config import ServeConfig
from neurallm.data.tokenizers import Detokenizer, line_break_token
from neurallm.errors import NeurallmError
from neurallm.generation import GenerationStream, TokenChoice, stream_generation
from neurallm.sampling import DEFAULT_TOKENS, MAX_SEED, SamplingSettings
from neurallm.scoring import score_ids
from neurallm.server.calls import ModelCalls, is_end
from neurallm.server.errors import ApiError, error_body
from neurallm.server.schemas import MAX_TEMPERATURE
from neurallm.server.worker import Deadline

logger = logging.getLogger(__name__)

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 200
EOS_TEXT = "\n"  # how every level writes the end of a line


def _openai_request(settings: ServeConfig) -> type[BaseModel]:
    class CompletionRequest(BaseModel):
        # strict types, no NaN; fields OpenAI clients may send that change nothing here (user, ...) are ignored
        model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
        model: str | None = Field(None, description="any id: this server has one model")
        prompt: str | list[str] | list[int] | list[list[int]] = Field("", description="text, texts, token ids or lists of them")
        max_tokens: int | None = Field(None, ge=0, le=settings.max_tokens,
                                       description=f"default {DEFAULT_TOKENS} capped by --max-tokens; 0 with echo scores the prompt")
        temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1, description="an extension: sample among the k most likely; -1 or 0: all")
        seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i uses seed + i; none: a random seed")
        stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings that end a choice, not included")
        n: int = Field(1, ge=1, le=MAX_N)
        stream: bool = False
        stream_options: dict | None = None
        echo: bool = False
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
        best_of: int | None = None
        frequency_penalty: float = 0.0
        presence_penalty: float = 0.0
        logit_bias: dict | None = None
        suffix: str | None = None

    return CompletionRequest


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # neurallm has no special tokens to add: accepted and ignored


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[int]


def add_openai_routes(app: FastAPI, run: Run, settings: ServeConfig, calls: ModelCalls) -> None:
    """Add the OpenAI-compatible routes serving ``run`` to ``app``."""
    model_id = run.folder.resolve().name
    created = int(time.time())
    CompletionRequest = _openai_request(settings)
    vocab, tokenizer = run.vocab, run.config.tokenizer

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        key = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(key.encode(), settings.api_key.encode()):
            raise ApiError(401, "a missing or wrong API key: send the server's --api-key as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    router = APIRouter(dependencies=[Depends(check_key)])

    @router.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return _model_card(model_id, created)

    @router.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        raise ApiError(400, f"{model_id} is a base language model trained on plain text: it has no chat template, so "
                            "there is no honest way to turn messages into its input; send the text to continue to "
                            "/v1/completions instead", code="chat_not_supported")

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        _check_chars(body.prompt, settings, "prompt")
        ids = _prompt_stream(run, body.prompt).prompt_ids
        return {"count": len(ids), "max_model_len": settings.max_prompt_chars, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return {"prompt": _prompt_stream(run, _checked_ids(body.tokens, len(vocab), "tokens")).prompt_text}

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": f"neurallm-{tokenizer.level}", "eos_token": EOS_TEXT, "bos_token": None,
                "pad_token": None, "unk_token": "<unk>", "model_max_length": settings.max_prompt_chars,
                "vocab_size": len(vocab), "level": tokenizer.level, "lowercase": tokenizer.lowercase}

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[valid-type]
        plan = _plan(body, run, settings)
        if not body.stream:
            choices = await calls.answer(request, lambda deadline: _complete(run, plan, deadline))
            return _completion(model_id, plan, choices)
        items = await calls.stream(lambda deadline, emit: _complete(run, plan, deadline, emit))
        return StreamingResponse(_sse_chunks(run, model_id, plan, items), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    app.include_router(router)


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "neurallm"}


def _check_chars(text: str, settings: ServeConfig, param: str) -> None:
    if len(text) > settings.max_prompt_chars:
        raise ApiError(400, f"{param} has {len(text):,} characters; the server takes at most {settings.max_prompt_chars:,} "
                            "(--max-prompt-chars)", param=param)


def _checked_ids(ids: list[int], vocab_size: int, param: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ApiError(400, f"{param}: token id {bad[0]} is not in the vocabulary (0..{vocab_size - 1})", param=param)
    return ids


def _prompt_stream(run: Run, prompt: str | list[int], settings: SamplingSettings | None = None, **options) -> GenerationStream:
    """A generation, not started: its prompt is tokenized (or read as ids) and ready to read or to run."""
    return stream_generation(run.model, run.vocab, run.config.tokenizer, prompt,
                             run.sampling(settings or SamplingSettings(tokens=1)), **options)


@dataclass
class _Plan:
    """A completion request, checked: its prompts, the sampling settings of each choice, and what to report."""

    prompts: list
    n: int
    max_tokens: int
    sampling: list[SamplingSettings]
    stop: list[str]
    echo: bool
    logprobs: int | None
    include_usage: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _plan(body, run: Run, settings: ServeConfig) -> _Plan:
    for param, value, neutral in (("frequency_penalty", body.frequency_penalty, 0.0), ("presence_penalty", body.presence_penalty, 0.0),
                                  ("logit_bias", body.logit_bias or None, None), ("suffix", body.suffix or None, None)):
        if value != neutral:
            raise ApiError(400, f"{param} is not supported by neurallm; leave it out", param=param)
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of is not supported by neurallm (every choice is returned); leave it out", param="best_of")
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt is an empty list; send a text, a list of texts or token ids", param="prompt")
    for p in prompts:
        if isinstance(p, str):
            _check_chars(p, settings, "prompt")
        else:
            _checked_ids(p, len(run.vocab), "prompt")
            if len(p) > settings.max_prompt_chars:
                raise ApiError(400, f"prompt has {len(p):,} token ids; the server takes at most {settings.max_prompt_chars:,}",
                               param="prompt")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", param="stop")
    max_tokens = min(DEFAULT_TOKENS, settings.max_tokens) if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 generates nothing; add echo: true to score the prompt, or ask for tokens",
                       param="max_tokens")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options applies only with stream: true", param="stream_options")
    base_seed = body.seed if body.seed is not None else secrets.randbits(64)
    defaults = SamplingSettings()
    try:
        sampling = [SamplingSettings(tokens=max(1, max_tokens),
                                     temperature=defaults.temperature if body.temperature is None else body.temperature,
                                     top_k=None if body.top_k in (None, -1, 0) else body.top_k, top_p=body.top_p,
                                     seed=(base_seed + i) % (MAX_SEED + 1)) for i in range(body.n)]
    except NeurallmError as exc:
        raise ApiError(400, str(exc)) from None
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return _Plan(prompts, body.n, max_tokens, sampling, stop, body.echo, body.logprobs, include_usage)


def _token_text(run: Run, token: str) -> str:
    """A token as text on its own (``<eos>`` as a line break, a BPE piece as its characters)."""
    return Detokenizer(run.config.tokenizer.level, bpe=run.vocab.bpe).piece(token) or token


def _prompt_logprobs(run: Run, stream: GenerationStream, top: int) -> dict:
    """The echoed prompt's logprobs block: ``neurallm score``'s values, the first token's ``null``."""
    vocab = run.vocab
    start = vocab.encode([line_break_token(run.config.tokenizer, vocab.bpe)])[0]
    scores = score_ids(run.model, start + stream.prompt_ids, bptt=run.config.train.bptt, top=max(1, top))
    tokens = [_token_text(run, t) for t in stream.prompt_tokens]
    offsets, detokenizer, written = [], Detokenizer(run.config.tokenizer.level, bpe=vocab.bpe), 0
    for token in stream.prompt_tokens:
        offsets.append(written)
        written += len(detokenizer.piece(token))
    tops = [None] + [_top_dict(run, alternatives[:top]) for alternatives in scores.top[1:]]
    return {"tokens": tokens, "token_logprobs": [None] + scores.logprobs[1:], "top_logprobs": tops, "text_offset": offsets}


def _top_dict(run: Run, alternatives: list[tuple[int, float]]) -> dict[str, float]:
    return {_token_text(run, run.vocab.tokens[i]): v for i, v in alternatives}


def _choice_logprobs(run: Run, choices: list[TokenChoice], offset: int) -> dict:
    return {"tokens": [_token_text(run, c.token) for c in choices],
            "token_logprobs": [c.logprob for c in choices],
            "top_logprobs": [_top_dict(run, c.top) for c in choices],
            "text_offset": [offset + c.offset for c in choices]}


def _complete(run: Run, plan: _Plan, deadline: Deadline, emit: Callable | None = None) -> list[dict]:
    """Every choice of ``plan``, one after another on the worker thread; with ``emit``, each piece of text too."""
    results = []
    for p, prompt in enumerate(plan.prompts):
        echo_text, echo_logprobs = "", None
        for i, sampling in enumerate(plan.sampling):
            index = p * plan.n + i
            stream = _prompt_stream(run, prompt, sampling, stop=plan.stop, top_logprobs=plan.logprobs or 0,
                                    should_stop=lambda: deadline.check() or False)
            if plan.echo and i == 0:
                echo_text = prompt if isinstance(prompt, str) else stream.prompt_text
                if plan.logprobs is not None:
                    echo_logprobs = _prompt_logprobs(run, stream, plan.logprobs)
            offset = len(echo_text) if plan.echo else 0  # where the generated text starts in the choice's text
            if plan.echo and emit is not None and echo_text:
                emit((index, echo_text, None, 0))
            if plan.max_tokens > 0:
                for piece in stream:
                    if emit is not None and (piece.text or piece.token is not None):
                        emit((index, piece.text, piece.token, offset))
            deadline.check()
            logprobs = None
            if plan.logprobs is not None:
                generated = _choice_logprobs(run, stream.choices, offset)
                logprobs = ({k: echo_logprobs[k] + generated[k] for k in generated} if plan.echo else generated)
            text = (echo_text if plan.echo else "") + stream.text
            results.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": stream.finish_reason or "length",
                            "prompt_tokens": len(stream.prompt_ids), "completion_tokens": len(stream.choices)})
    return results


def _usage(plan: _Plan, choices: list[dict]) -> dict:
    prompt_tokens = sum(c["prompt_tokens"] for c in choices if c["index"] % plan.n == 0)
    completion_tokens = sum(c["completion_tokens"] for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _completion(model_id: str, plan: _Plan, choices: list[dict]) -> dict:
    return {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model_id,
            "choices": [{k: c[k] for k in ("index", "text", "logprobs", "finish_reason")} for c in choices],
            "usage": _usage(plan, choices)}


async def _sse_chunks(run: Run, model_id: str, plan: _Plan, items: AsyncIterator) -> AsyncIterator[str]:
    """``data: {chunk}`` per piece of text, a last chunk per choice with its finish_reason, then ``data: [DONE]``."""
    def chunk(index: int, text: str, logprobs, finish_reason) -> str:
        body = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model_id,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        async for item in items:
            if is_end(item):
                for choice in item.result:
                    yield chunk(choice["index"], "", None, choice["finish_reason"])
                if plan.include_usage:
                    usage = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": model_id,
                             "choices": [], "usage": _usage(plan, item.result)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            index, text, token, offset = item
            logprobs = None
            if plan.logprobs is not None and token is not None:
                logprobs = _choice_logprobs(run, [token], offset)
            yield chunk(index, text, logprobs, None)
    except ApiError as exc:
        yield f"data: {json.dumps(error_body('/v1/completions', exc.status, exc.message, code=exc.code))}\n\n"
    except Exception as exc:  # a bug: the status line is sent already, so the stream ends with an error chunk
        logger.error("streamed completion failed", exc_info=exc)
        message = f"internal error ({exc.__class__.__name__}); the server log has the details"
        yield f"data: {json.dumps(error_body('/v1/completions', 500, message))}\n\n"
    finally:
        await items.aclose()
    yield "data: [DONE]\n\n"
