"""A cap on request bodies, so a client cannot make the server read megabytes it will refuse anyway."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """The request body is larger than the server accepts (answered 413)."""


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by its Content-Length or, without one, while it arrives."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes:,} bytes; shorten the prompt or text (see --max-prompt-chars)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"error": self._message()}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message())  # answered by the app's exception handler
            return message

        await self.app(scope, limited_receive, send)
