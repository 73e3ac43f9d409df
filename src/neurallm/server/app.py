"""The web page and HTTP API of ``neurallm serve``: a FastAPI application around one loaded run.

::

    GET  /                     the page: prompt, controls, text streamed token by token, the model's facts
    POST /api/generate         {prompt, tokens, temperature, top_k, top_p, seed, context} -> {text, tokens, seconds, prompt_unknown}
    POST /api/generate/stream  the same request; server-sent events: one `token` event per token, then `done`
    POST /api/score            {text} -> per-token log-probabilities, total loss, perplexity
    GET  /api/info             the model's facts and the server's limits
    GET  /healthz              {"status": "ok"}
    GET  /docs, /openapi.json  the OpenAPI schema (FastAPI)
    /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize, /tokenizer_info
                               OpenAI- and vLLM-compatible (:mod:`neurallm.server.openai_api`)

Every ``/api`` error is JSON ``{"error": "...", "detail": [...]}`` with a 4xx status (400 malformed JSON or a
Host not served, 413 body too large, 422 invalid field, 503 queue full or stopping, with ``Retry-After``, 504
time out); the OpenAI routes answer in OpenAI's error shape (:mod:`neurallm.server.errors`). Generation goes
through the library's one route (:func:`neurallm.generation.stream_generation`, with the run's defaults from
:meth:`neurallm.api.Run.sampling`); scoring through :meth:`neurallm.api.Run.score`. Model work runs on one
worker thread (:mod:`neurallm.server.worker`). Nothing here reads or writes a file after start-up: the page,
the facts and the model are loaded once, in :func:`create_app`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time, and the
# request classes are local to create_app (their caps come from the server's settings).

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neurallm._version import __version__
from neurallm.api import Run
from neurallm.config import ServeConfig
from neurallm.errors import ConfigError, NeurallmError
from neurallm.generation import GenerationStream, Piece, stream_generation
from neurallm.sampling import SamplingSettings
from neurallm.server.calls import ClientGone, ModelCalls, is_end
from neurallm.server.errors import ApiError, error_response, is_openai_path
from neurallm.server.facts import model_facts
from neurallm.server.limits import BodyLimit, HostCheck, allowed_host_names, body_cap
from neurallm.server.schemas import ErrorResponse, GenerateResponse, ScoreResponse, TokenLogprob, request_models, sampling_of
from neurallm.server.worker import Deadline, ModelWorker

logger = logging.getLogger(__name__)

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 413, 422, 503, 504)}
CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads it, the connection is gone


def check_can_generate(run: Run) -> None:
    """Refuse, with one line, a run that cannot generate: its own context is unusable, or its BPE tokenizer is
    missing, or a one-token generation fails."""
    if run.config.tokenizer.level == "bpe" and run.vocab.bpe is None:
        raise ConfigError(f"{run.folder} is a BPE run without its tokenizer.json, so prompts cannot be read and tokens "
                          "cannot be written as text; copy the run folder whole")
    settings = run.sampling(SamplingSettings(tokens=1, temperature=0))
    for _ in stream_generation(run.model, run.vocab, run.config.tokenizer, "", settings):
        pass


def generate_with(run: Run, prompt, settings: SamplingSettings, deadline: Deadline, *, stop=(), top_logprobs: int = 0,
                  on_piece: Callable[[Piece], None] | None = None) -> GenerationStream:
    """One generation for a request, on the worker thread: the library's route with the run's defaults, stopped
    by the request's deadline (or a client that left) after any token."""
    stream = stream_generation(run.model, run.vocab, run.config.tokenizer, prompt, run.sampling(settings), stop=stop,
                               should_stop=lambda: deadline.check() or False, top_logprobs=top_logprobs)
    for piece in stream:
        if on_piece is not None:
            on_piece(piece)
    return stream


def create_app(run: Run, settings: ServeConfig) -> FastAPI:
    """The application serving ``run`` with the limits of ``settings`` (see the module docstring)."""
    check_can_generate(run)
    models = request_models(settings)
    GenerateRequest, ScoreRequest = models.generate, models.score
    worker = ModelWorker(settings.max_queue)
    calls = ModelCalls(worker, settings.timeout)
    facts = model_facts(run, settings)
    page = resources.files("neurallm.server").joinpath("page.html").read_text(encoding="utf-8")

    app = FastAPI(title="neurallm", version=__version__, description=f"Generate and score text with the run {facts['run']}.")
    app.state.worker = worker
    app.router.on_shutdown.append(worker.shutdown)
    app.add_middleware(BodyLimit, max_bytes=body_cap(settings.max_prompt_chars))
    app.add_middleware(HostCheck, allowed=allowed_host_names(settings.host, settings.allowed_hosts))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is left out: it may be megabytes, and the client already has it
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        param = where if where != "body" else None
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(request.url.path, 400, f"the body is not valid JSON ({first['msg']} at character "
                                  f"{first['loc'][-1]}); send a JSON object", detail=errors)
        # OpenAI's clients expect 400 for an invalid parameter; the page's API has always said 422
        status = 400 if is_openai_path(request.url.path) else 422
        return error_response(request.url.path, status, f"{where}: {first['msg']}", param=param, detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not a bad request: still one JSON line for the client, and the traceback in the server's log
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, 500, f"internal error ({exc.__class__.__name__}); the server log has the details")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    def answer_of(stream: GenerationStream, started: float) -> GenerateResponse:
        result = stream.result()
        return GenerateResponse(text=result.text, tokens=len(result.generated_tokens),
                                seconds=round(time.perf_counter() - started, 4), prompt_unknown=result.prompt_unknown)

    def sample(prompt: str, sampling: SamplingSettings, deadline: Deadline, on_piece=None) -> GenerateResponse:
        started = time.perf_counter()
        return answer_of(generate_with(run, prompt, sampling, deadline, on_piece=on_piece), started)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    for path, endpoint in (("/", index), ("/healthz", healthz)):  # HEAD: what monitors and `curl -I` send
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    @app.get("/api/info")
    async def info() -> dict:
        return facts

    @app.post("/api/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def api_generate(body: GenerateRequest, request: Request) -> GenerateResponse:  # type: ignore[valid-type]
        sampling = _checked(sampling_of, body)
        return await calls.answer(request, lambda deadline: sample(body.prompt, sampling, deadline))

    @app.post("/api/generate/stream", responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES})
    async def api_generate_stream(body: GenerateRequest) -> StreamingResponse:  # type: ignore[valid-type]
        sampling = _checked(sampling_of, body)
        # admitted (or refused with 503) before the stream starts, so a full queue is still a plain HTTP error
        items = await calls.stream(lambda deadline, emit: sample(body.prompt, sampling, deadline, emit))
        return StreamingResponse(_events(items), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/api/score", response_model=ScoreResponse, responses=ERROR_RESPONSES)
    async def api_score(body: ScoreRequest, request: Request) -> ScoreResponse:  # type: ignore[valid-type]
        started = time.perf_counter()
        (scored,) = await calls.answer(request, lambda deadline: run.score([body.text]))
        return ScoreResponse(
            tokens=[TokenLogprob(token=t, logprob=lp, unknown=t not in run.vocab.index) for t, lp in zip(scored.tokens, scored.logprobs)],
            token_count=len(scored.tokens), total_loss=scored.total_loss, loss=scored.loss, ppl=scored.ppl,
            unknown=scored.unknown, seconds=round(time.perf_counter() - started, 4))

    from neurallm.server.openai_api import add_openai_routes

    add_openai_routes(app, run, settings, calls)
    return app


def _checked(make, *args):
    """``make(*args)``, a settings error (a range the schema cannot express) answered as 422."""
    try:
        return make(*args)
    except NeurallmError as exc:
        raise ApiError(422, str(exc)) from None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(items: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events: ``token`` {token, text} per token, then ``done`` (the /api/generate answer) or ``error``.

    The ``text`` pieces add up to the answer's text after the prompt (a BPE character split across tokens arrives
    whole, with the token that completes it; bytes that never complete one come in a last ``text`` event).
    """
    try:
        async for item in items:
            if is_end(item):
                yield _sse("done", item.result.model_dump())
            elif item.token is not None:
                yield _sse("token", {"token": item.token.token, "text": item.text})
            elif item.text:
                yield _sse("text", {"text": item.text})
    except ApiError as exc:
        yield _sse("error", {"error": exc.message})
    except Exception as exc:  # a bug: the status line is sent already, so the stream ends with an error event
        logger.error("streamed generation failed", exc_info=exc)
        yield _sse("error", {"error": f"internal error ({exc.__class__.__name__}); the server log has the details"})
    finally:
        await items.aclose()  # the client left, or the stream ended: stop the generation at its next token
