"""Checks every request passes before a route sees it: a cap on the body, and the ``Host`` header.

The body cap keeps a client from making the server hold megabytes it will refuse anyway. It is a byte bound
derived from the character limits: one character may take 12 bytes once JSON-escaped (an emoji outside the
Basic Multilingual Plane is a surrogate pair, ``\\ud83d\\ude00``), so a prompt of ``--max-prompt-chars``
characters always fits, however it is written; the routes then count characters.

The ``Host`` check closes DNS rebinding: a web page on ``evil.example.com`` whose name is re-pointed at
127.0.0.1 would otherwise reach a loopback-bound server from the user's browser. Only the names the server was
bound under (and ``--allowed-hosts``) are answered.
"""

from __future__ import annotations

import ipaddress

from neurallm.server.errors import send_error

JSON_BYTES_PER_CHAR = 12
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def body_cap(max_prompt_chars: int) -> int:
    """Bytes a request body may have: the longest prompt fully JSON-escaped, plus room for the other fields."""
    return JSON_BYTES_PER_CHAR * max_prompt_chars + 16_384


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, by its Content-Length or, without one, as it arrives."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope, send) -> None:
        await send_error(send, scope.get("path", ""), 413,
                         f"request body larger than {self.max_bytes:,} bytes; shorten the prompt or text (see --max-prompt-chars)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, send)
                return
            await self.app(scope, receive, send)  # the server stops reading at the declared length
            return
        # A chunked body has no declared length: read it here, counting, and hand it on whole.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def allowed_host_names(host: str, extra: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The ``Host`` names a server bound to ``host`` answers (None: any).

    Loopback: 127.0.0.1, localhost and ::1. A named address: that name. The wildcard addresses (0.0.0.0, ::)
    answer any name, since the names that reach them are not known here; ``--allowed-hosts`` then narrows it
    (``*`` in it allows any name).
    """
    names: set[str] = set()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        if not extra:
            return None
    elif address is not None and address.is_loopback or host == "localhost":
        names.update(LOOPBACK_NAMES)
    names.add(host.lower())
    names.update(name.lower() for name in extra or ())
    return None if "*" in names else tuple(sorted(names))


def _host_name(header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: 400 for a request whose ``Host`` header names none of ``allowed`` (None: allow all)."""

    def __init__(self, app, allowed: tuple[str, ...] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.allowed is None:
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if _host_name(host) not in self.allowed:
            await send_error(send, scope.get("path", ""), 400,
                             f"Host {host!r} is not served here (allowed: {', '.join(self.allowed)}); "
                             "start the server with --allowed-hosts NAME to answer it")
            return
        await self.app(scope, receive, send)
