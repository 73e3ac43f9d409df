"""Load test of `neurallm serve` on the loopback interface: requests/s and latency for 1, 8 and 32 clients.

Starts ``neurallm serve RUN`` as a child process on 127.0.0.1 (a free port; nothing leaves the machine),
then, for each endpoint and client count, lets that many threads send requests back to back until
``--requests`` answers have come back or ``--max-seconds`` have passed (whichever is first), and prints
requests/s, p50 and p95 latency (of the whole answer; for the streamed endpoints, p50 of the first token
too) and how many answers were not 200 (503 = queue full). The endpoints: the page's ``/api/generate`` and
``/api/generate/stream``, and the OpenAI-compatible ``/v1/completions``, plain and with ``stream: true``.
Then it times single 100-token generations (plain and streamed: time to the first token and to the end).

::

    python benchmarks/serve_load.py runs/wt2-lstm                 # a run you trained
    python benchmarks/serve_load.py --train /tmp/bench-run        # first trains a PyTorch-example-sized LSTM on wt2-lite

The model calls are serialised (one worker thread), so requests/s is bounded by one generation at a time
and latency grows with the number of clients waiting: the figures show the queue, not a parallel speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def start_server(run: Path, port: int, max_queue: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "neurallm", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
                                "--max-queue", str(max_queue), "--timeout", "120"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit("the server did not answer /healthz within 120 s")
            time.sleep(0.2)


# name -> (path, body for a seed and a token count, streamed)
ENDPOINTS = {
    "/api/generate": ("/api/generate", lambda seed, tokens: {"prompt": "the", "tokens": tokens, "seed": seed}, False),
    "/api/generate/stream": ("/api/generate/stream", lambda seed, tokens: {"prompt": "the", "tokens": tokens, "seed": seed}, True),
    "/v1/completions": ("/v1/completions", lambda seed, tokens: {"prompt": "the", "max_tokens": tokens, "seed": seed}, False),
    "/v1/completions stream": ("/v1/completions",
                               lambda seed, tokens: {"prompt": "the", "max_tokens": tokens, "seed": seed, "stream": True}, True),
}


def _timed_request(url: str, endpoint: str, seed: int, tokens: int) -> tuple[int, float, float | None]:
    """(status, seconds to the whole answer, seconds to the first streamed event or None)."""
    path, body, streamed = ENDPOINTS[endpoint]
    started = time.perf_counter()
    if not streamed:
        status, _ = _post(url + path, body(seed, tokens))
        return status, time.perf_counter() - started, None
    request = urllib.request.Request(url + path, data=json.dumps(body(seed, tokens)).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.readline()  # the first event's first line: the first token
            first = time.perf_counter() - started
            response.read()
            return response.status, time.perf_counter() - started, first
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, time.perf_counter() - started, None


def load(url: str, clients: int, requests: int, max_seconds: float, tokens: int, endpoint: str = "/api/generate") -> dict:
    """``clients`` threads send ``endpoint`` requests back to back; at most ``requests`` in all, for ``max_seconds``."""
    latencies: list[float] = []
    firsts: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    sent = 0
    stop_at = time.monotonic() + max_seconds

    def client(index: int) -> None:
        nonlocal sent
        while True:
            with lock:
                if sent >= requests or time.monotonic() >= stop_at:
                    return
                sent += 1
                seed = sent
            status, seconds, first = _timed_request(url, endpoint, seed, tokens)
            with lock:
                latencies.append(seconds)
                statuses.append(status)
                if first is not None and status == 200:
                    firsts.append(first)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [lat for lat, status in zip(latencies, statuses) if status == 200]
    return {"endpoint": endpoint, "clients": clients, "requests": len(latencies), "ok": len(ok),
            "not_ok": len(latencies) - len(ok), "requests_per_s": len(ok) / wall,
            "p50_ms": 1000 * _percentile(ok, 0.5) if ok else None, "p95_ms": 1000 * _percentile(ok, 0.95) if ok else None,
            "first_token_p50_ms": 1000 * _percentile(firsts, 0.5) if firsts else None, "seconds": wall}


def single_generation(url: str, tokens: int, repeats: int) -> dict:
    """Latency of one ``tokens``-token generation with the server otherwise idle: plain, and streamed."""
    plain, first_token, streamed = [], [], []
    for seed in range(repeats):
        started = time.perf_counter()
        status, body = _post(url + "/api/generate", {"prompt": "the", "tokens": tokens, "seed": seed})
        assert status == 200 and json.loads(body)["tokens"] == tokens, body
        plain.append(time.perf_counter() - started)
        request = urllib.request.Request(url + "/api/generate/stream", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "the", "tokens": tokens, "seed": seed}).encode())
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.readline()
            first_token.append(time.perf_counter() - started)
            response.read()
        streamed.append(time.perf_counter() - started)
    ms = lambda values: round(1000 * statistics.median(values), 1)  # noqa: E731
    return {"tokens": tokens, "repeats": repeats, "generate_ms": ms(plain), "stream_first_token_ms": ms(first_token),
            "stream_total_ms": ms(streamed), "ms_per_token": round(1000 * statistics.median(plain) / tokens, 2)}


def train_benchmark_run(out: Path) -> Path:
    """A PyTorch-example-sized LSTM (2×200) on wt2-lite, trained briefly: the weights' quality does not change the speed."""
    if (out / "model.safetensors").is_file() and (out / "results.json").is_file():
        return out
    data = REPO.parent / "shared" / "data" / "wt2-lite"
    command = [sys.executable, "-m", "neurallm", "train", "--data", str(data), "--out", str(out), "--force", "--epochs", "1",
               "--max-time", "30", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(command, check=True, env=env)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="run directory to serve")
    parser.add_argument("--train", type=Path, help="train a benchmark run into this folder first (if it is not there)")
    parser.add_argument("--clients", default="1,8,32", help="client counts (default 1,8,32)")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS),
                        help=f"comma-separated endpoints to load (default: all of {', '.join(ENDPOINTS)})")
    parser.add_argument("--requests", type=int, default=64, help="answers per client count (default 64)")
    parser.add_argument("--max-seconds", type=float, default=60, help="time limit per client count (default 60)")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per load-test request (default 20)")
    parser.add_argument("--latency-tokens", type=int, default=100, help="tokens of the single-generation timing (default 100)")
    parser.add_argument("--repeats", type=int, default=10, help="single generations timed (default 10)")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default 64)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.run is None and args.train is None:
        parser.error("give a RUN directory, or --train FOLDER to train a benchmark run first")
    run = args.run if args.run is not None else train_benchmark_run(args.train)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(run, port, args.max_queue)
    try:
        info = json.loads(urllib.request.urlopen(url + "/api/info", timeout=30).read())
        _post(url + "/api/generate", {"tokens": 5})  # warm-up
        endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
        unknown = sorted(set(endpoints) - ENDPOINTS.keys())
        if unknown:
            parser.error(f"unknown endpoint(s) {', '.join(unknown)}; known: {', '.join(ENDPOINTS)}")
        rows = [load(url, int(n), args.requests, args.max_seconds, args.tokens, endpoint)
                for endpoint in endpoints for n in args.clients.split(",")]
        latency = single_generation(url, args.latency_tokens, args.repeats)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.json:
        print(json.dumps({"model": info, "load": rows, "latency": latency}))
        return
    print(f"{info['model']} {info['layers']}x{info['nhid']}, {info['parameters']:,} parameters, vocabulary {info['vocabulary']:,}; "
          f"{args.tokens} tokens per request, {os.cpu_count()} CPUs")
    print(f"{'endpoint':<24} {'clients':>8} {'answers':>8} {'not 200':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'first ms':>9}")
    shown = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    for r in rows:
        print(f"{r['endpoint']:<24} {r['clients']:>8} {r['requests']:>8} {r['not_ok']:>8} {r['requests_per_s']:>8.1f} "
              f"{shown(r['p50_ms']):>8} {shown(r['p95_ms']):>8} {shown(r['first_token_p50_ms']):>9}")
    print(f"{latency['tokens']}-token generation (median of {latency['repeats']}): {latency['generate_ms']} ms "
          f"({latency['ms_per_token']} ms/token); streamed: first token {latency['stream_first_token_ms']} ms, "
          f"all {latency['stream_total_ms']} ms")


if __name__ == "__main__":
    main()
