"""Errors as the HTTP API answers them: one JSON shape for the page's ``/api`` endpoints, OpenAI's for the others.

``/api/*``: ``{"error": "one line", "detail": [...]}``. The OpenAI-compatible endpoints (``/v1/*``, ``/tokenize``,
``/detokenize``, ``/tokenizer_info``): ``{"error": {"message", "type", "param", "code"}}``, as the ``openai``
client and lm-evaluation-harness read them.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

OPENAI_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
# OpenAI's error types by status
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "server_busy", 504: "timeout"}


class ApiError(Exception):
    """An error answered as JSON with ``status``; ``param`` names the request field at fault (OpenAI shape)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.param, self.code = status, message, headers, param, code


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def error_body(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None,
               detail: list | None = None) -> dict:
    """The JSON body of an error on ``path``."""
    if is_openai_path(path):
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": message, **({"detail": detail} if detail is not None else {})}


def error_response(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None,
                   detail: list | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param=param, code=code, detail=detail), status_code=status,
                        headers=headers)


async def send_error(send, path: str, status: int, message: str) -> None:
    """Answer an error from ASGI middleware (before any route runs)."""
    body = json.dumps(error_body(path, status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
