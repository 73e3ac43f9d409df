"""``neurallm serve``: a web page and an HTTP API around one trained run (see :mod:`neurallm.server.app`)."""

from __future__ import annotations

import socket
from pathlib import Path

from neurallm.config import ServeConfig
from neurallm.errors import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a ConfigError naming the flags."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on --host {host} --port {port} ({exc.strerror or exc}); choose another --port or --host") from None
    return sock


def serve(run_dir: str | Path, settings: ServeConfig, *, checkpoint: str = "best", device: str = "auto") -> None:
    """Load the run once and serve it until interrupted."""
    try:
        import uvicorn

        from neurallm.server.app import create_app
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise ConfigError(f"neurallm serve needs {exc.name}, which is not installed: pip install 'neurallm[serve]' "
                          "(or -e '.[serve]' in a checkout)") from None
    from neurallm.api import load_run

    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    app = create_app(run, settings)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    print(f"serving {run.folder} at http://{host}:{port}/ (API docs at /docs; OpenAI-compatible API at /v1); Ctrl-C stops",
          flush=True)
    worker = app.state.worker

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Ctrl-C or SIGTERM: stop the model work in flight first, so each request gets a clean 503 ("the
            # server is stopping") at its next token instead of being cut off by the graceful-shutdown timeout
            worker.shutdown()
            super().handle_exit(sig, frame)

    server = StoppingServer(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly and re-raises the Ctrl-C; for a server that is the normal way to stop
    print("server stopped", flush=True)
