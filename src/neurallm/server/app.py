"""The web page and HTTP API of ``neurallm serve``: a FastAPI application around one loaded run.

::

    GET  /                     the page: prompt, controls, text streamed token by token, the model's facts
    POST /api/generate         {prompt, tokens, temperature, top_k, top_p, seed} -> {text, tokens, seconds, prompt_unknown}
    POST /api/generate/stream  the same request; server-sent events: one `token` event per token, then `done`
    POST /api/score            {text} -> per-token log-probabilities, total loss, perplexity
    GET  /api/info             the model's facts and the server's limits
    GET  /healthz              {"status": "ok"}
    GET  /docs, /openapi.json  the OpenAPI schema (FastAPI)

Every error is JSON ``{"error": "...", "detail": [...]}`` with a 4xx status (400 malformed JSON, 413 body too
large, 422 invalid field, 503 queue full with ``Retry-After``, 504 time out); model work runs on one worker
thread (:mod:`neurallm.server.worker`). Nothing here reads or writes a file after start-up: the page, the
facts and the model are loaded once, in :func:`create_app`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and the
# request classes are local to create_app (their caps come from the server's settings).

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neurallm._version import __version__
from neurallm.api import Run
from neurallm.config import ServeConfig
from neurallm.errors import NeurallmError
from neurallm.generation import continue_text, detokenizer_after, iter_generate, prompt_to_tokens
from neurallm.scoring import score_texts
from neurallm.server.facts import model_facts
from neurallm.server.limits import BodyLimit
from neurallm.server.schemas import ErrorResponse, GenerateResponse, ScoreResponse, TokenLogprob, request_models
from neurallm.server.worker import Deadline, DeadlinePassed, ModelWorker, QueueFull

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
# the worker enforces the deadline between tokens; this is the extra wait before a stuck call is given up on
TIMEOUT_GRACE_SECONDS = 5.0
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 413, 422, 503, 504)}


class ApiError(Exception):
    """An error answered as JSON with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, detail: list | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, detail=detail).model_dump(exclude_none=True), status_code=status, headers=headers)


def create_app(run: Run, settings: ServeConfig) -> FastAPI:
    """The application serving ``run`` with the limits of ``settings`` (see the module docstring)."""
    models = request_models(settings)
    GenerateRequest, ScoreRequest = models.generate, models.score
    worker = ModelWorker(settings.max_queue)
    facts = model_facts(run, settings)
    page = resources.files("neurallm.server").joinpath("page.html").read_text(encoding="utf-8")
    tokenizer = run.config.tokenizer
    generation_context = run.config.train.bptt + run.config.model.memory  # as Run.generate's default

    app = FastAPI(title="neurallm", version=__version__, description=f"Generate and score text with the run {facts['run']}.")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.shutdown)
    # a prompt of N characters is at most 4N bytes of UTF-8, 6N once JSON-escaped; plus the other fields
    app.add_middleware(BodyLimit, max_bytes=6 * settings.max_prompt_chars + 4096)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is left out: it may be megabytes, and the client already has it
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, f"the body is not valid JSON ({first['msg']} at character {first['loc'][-1]}); send a JSON object", errors)
        return _error(422, f"{where}: {first['msg']}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not a bad request: still one JSON line for the client, and the traceback in the server's log
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({exc.__class__.__name__}); the server log has the details")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, headers=exc.headers)

    async def on_worker(fn: Callable, *args, deadline: Deadline):
        """Run ``fn(*args)`` on the model worker and wait for it, mapping its failures to API errors."""
        future = _submit(worker, fn, *args, deadline=deadline)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout + TIMEOUT_GRACE_SECONDS)
        except (DeadlinePassed, asyncio.TimeoutError):
            raise ApiError(504, f"the request took longer than the server's --timeout {settings.timeout:g} s; ask for fewer tokens") from None
        except NeurallmError as exc:
            raise ApiError(422, str(exc)) from None
        finally:
            deadline.cancelled.set()  # a client that left stops its generation at the next token

    def sample(body, deadline: Deadline, on_token: Callable[[str], None] | None = None) -> GenerateResponse:
        """Generate on the worker thread, checking the deadline after every token."""
        started = time.perf_counter()
        generated: list[str] = []
        for token in iter_generate(run.model, run.vocab, tokenizer, prompt=body.prompt, tokens=body.tokens,
                                   temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed,
                                   context=generation_context):
            generated.append(token)
            if on_token is not None:
                on_token(token)
            deadline.check()
        unknown = [t for t in prompt_to_tokens(body.prompt, tokenizer, run.vocab.bpe) if t not in run.vocab.index]
        return GenerateResponse(text=continue_text(body.prompt, generated, tokenizer, run.vocab.bpe), tokens=len(generated),
                                seconds=round(time.perf_counter() - started, 4), prompt_unknown=unknown)

    def score(texts: list[str]):
        return score_texts(run.model, run.vocab, tokenizer, texts, bptt=run.config.train.bptt)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/info")
    async def info() -> dict:
        return facts

    @app.post("/api/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def api_generate(body: GenerateRequest) -> GenerateResponse:  # type: ignore[valid-type]
        deadline = Deadline(settings.timeout)
        return await on_worker(sample, body, deadline, deadline=deadline)

    @app.post("/api/generate/stream", responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES})
    async def api_generate_stream(body: GenerateRequest) -> StreamingResponse:  # type: ignore[valid-type]
        deadline = Deadline(settings.timeout)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[str] = asyncio.Queue()
        # admitted (or refused with 503) before the stream starts, so a full queue is still a plain HTTP error
        future = _submit(worker, sample, body, deadline, lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token),
                         deadline=deadline)
        return StreamingResponse(_events(body.prompt, tokenizer, run.vocab.bpe, tokens, future, deadline, settings.timeout),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
    async def api_score(body: ScoreRequest) -> ScoreResponse:  # type: ignore[valid-type]
        deadline = Deadline(settings.timeout)
        started = time.perf_counter()
        (scored,) = await on_worker(score, [body.text], deadline=deadline)
        return ScoreResponse(
            tokens=[TokenLogprob(token=t, logprob=lp, unknown=t not in run.vocab.index) for t, lp in zip(scored.tokens, scored.logprobs)],
            token_count=len(scored.tokens), total_loss=scored.total_loss, loss=scored.loss, ppl=scored.ppl,
            unknown=scored.unknown, seconds=round(time.perf_counter() - started, 4))

    return app


def _submit(worker: ModelWorker, fn: Callable, *args, deadline: Deadline):
    try:
        return worker.submit(fn, *args, deadline=deadline)
    except QueueFull:
        raise ApiError(503, f"the server is busy ({worker.max_queue} requests running or waiting); retry in a moment",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(prompt: str, tokenizer, bpe, tokens: "asyncio.Queue[str]", future, deadline: Deadline,
                  timeout: float) -> AsyncIterator[str]:
    """Server-sent events: ``token`` {token, text} per token, then ``done`` (the /api/generate answer) or ``error``.

    The ``text`` pieces add up to the answer's text: one :class:`Detokenizer` joins them as generation does (a
    BPE character split across tokens arrives whole, with the token that completes it).
    """
    detokenizer = detokenizer_after(prompt if prompt_to_tokens(prompt, tokenizer, bpe) else "", tokenizer, bpe)
    done = asyncio.wrap_future(future)
    try:
        while True:
            # wait for the next token or the end of the generation, whichever comes first
            next_token = asyncio.ensure_future(tokens.get())
            finished, _ = await asyncio.wait({next_token, done}, timeout=timeout + TIMEOUT_GRACE_SECONDS,
                                             return_when=asyncio.FIRST_COMPLETED)
            if next_token in finished:
                token = next_token.result()
                yield _sse("token", {"token": token, "text": detokenizer.piece(token)})
                continue
            next_token.cancel()
            if not finished:
                raise asyncio.TimeoutError
            while not tokens.empty():  # tokens queued before the generation ended
                token = tokens.get_nowait()
                yield _sse("token", {"token": token, "text": detokenizer.piece(token)})
            yield _sse("done", done.result().model_dump())
            return
    except (DeadlinePassed, asyncio.TimeoutError):
        yield _sse("error", {"error": f"the request took longer than the server's --timeout {timeout:g} s; ask for fewer tokens"})
    except NeurallmError as exc:
        yield _sse("error", {"error": str(exc)})
    except Exception as exc:  # a bug: the status line is sent already, so the stream ends with an error event
        logger.error("streamed generation failed", exc_info=exc)
        yield _sse("error", {"error": f"internal error ({exc.__class__.__name__}); the server log has the details"})
    finally:
        deadline.cancelled.set()  # the client left, or the stream ended: stop the generation at its next token
