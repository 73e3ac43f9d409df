"""The server survives its clients and its own facts: Host check, HEAD, the body cap in characters, clients that
leave, Ctrl-C with a request in flight, runs that cannot generate, absurd contexts."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

import neurallm  # noqa: E402
from neurallm.config import ServeConfig  # noqa: E402
from neurallm.errors import ConfigError  # noqa: E402
from neurallm.server.app import create_app  # noqa: E402

from conftest import TINY_MODEL, serving, write_patterned_corpus  # noqa: E402


@pytest.fixture(scope="module")
def run(trained_run):
    return neurallm.load_run(trained_run)


def test_only_the_bound_host_names_are_answered(run):
    app = create_app(run, ServeConfig())
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert TestClient(app, base_url=f"http://{host}:8000").get("/healthz").status_code == 200, host
    rebound = TestClient(app, base_url="http://evil.example.com:8000")
    for path in ("/healthz", "/v1/models"):
        response = rebound.get(path)
        assert response.status_code == 400 and "--allowed-hosts" in json.dumps(response.json()), path
    assert "message" in rebound.get("/v1/models").json()["error"]  # the OpenAI routes answer in OpenAI's shape
    allowed = create_app(run, ServeConfig(allowed_hosts=("evil.example.com",)))
    assert TestClient(allowed, base_url="http://evil.example.com").get("/healthz").status_code == 200
    anywhere = create_app(run, ServeConfig(host="0.0.0.0"))
    assert TestClient(anywhere, base_url="http://my-box.lan").get("/healthz").status_code == 200


@pytest.mark.parametrize("argv,message", [(["--api-key", ""], "--api-key must not be empty"),
                                          (["--allowed-hosts", ","], "--allowed-hosts needs at least one name")])
def test_empty_keys_and_host_lists_are_one_line(trained_run, capsys, argv, message):
    from neurallm.cli import main

    assert main(["serve", str(trained_run), *argv]) == 1
    assert capsys.readouterr().err.strip() == f"neurallm serve: error: {message}" + (
        "; leave it out to accept any key" if "api-key" in message else " (or * for any)")


def test_head_of_the_page_and_healthz(run):
    client = TestClient(create_app(run, ServeConfig()), base_url="http://127.0.0.1")
    for path in ("/", "/healthz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path


def test_a_prompt_at_the_character_cap_is_accepted_however_it_is_escaped(run):
    client = TestClient(create_app(run, ServeConfig()), base_url="http://127.0.0.1")  # --max-prompt-chars 4000
    for prompt in ("😀" * 4000, "é" * 4000, "\u0001" * 4000):
        body = json.dumps({"prompt": prompt, "tokens": 1})  # ensure_ascii: "\ud83d\ude00" is 12 bytes per character
        response = client.post("/api/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, (prompt[:1], response.text)
    too_long = json.dumps({"prompt": "😀" * 4001, "tokens": 1})
    assert client.post("/api/generate", content=too_long, headers={"content-type": "application/json"}).status_code == 422


# --- a run that cannot generate, a context that cannot be allocated -------------------------------------------


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer")
    corpus = write_patterned_corpus(root / "corpus", lines=40)
    neurallm.train(corpus, root / "run", progress=False, **{**TINY_MODEL, "model": "Transformer", "nhead": 2})
    return root / "run"


def _with_config(run_dir, tmp_path, **train):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"].update(train)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_a_huge_context_is_one_line_before_any_allocation(transformer_run, tmp_path, capsys):
    from neurallm.cli import main

    assert main(["generate", str(transformer_run), "--context", "1000000000", "--tokens", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurallm generate: error: --context must be at most 1,000,000 positions") and "\n" not in err
    huge_bptt = _with_config(transformer_run, tmp_path, bptt=10**9)
    assert main(["generate", str(huge_bptt), "--tokens", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "bptt + memory (1,000,000,000)" in err and "--context" in err and "\n" not in err
    assert main(["generate", str(huge_bptt), "--tokens", "3", "--context", "16"]) == 0  # the way out works
    with pytest.raises(ConfigError, match="bptt"):  # the server refuses it at start
        create_app(neurallm.load_run(huge_bptt), ServeConfig())
    assert main(["serve", str(huge_bptt), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurallm serve: error: the run's bptt + memory") and "\n" not in err
    client = TestClient(create_app(neurallm.load_run(transformer_run), ServeConfig()), base_url="http://127.0.0.1")
    response = client.post("/api/generate", json={"context": 10**9, "tokens": 2})
    assert response.status_code == 422 and "context" in response.json()["error"]


def test_a_large_context_allocates_only_the_positions_a_generation_can_use(transformer_run, monkeypatch):
    run = neurallm.load_run(transformer_run)
    capacities = []
    real = type(run.model).start_generation

    def recording(self, batch_size, context, device="cpu"):
        capacities.append(context)
        return real(self, batch_size, context, device)

    monkeypatch.setattr(type(run.model), "start_generation", recording)
    huge = run.generate("the cat", tokens=5, seed=1, context=1_000_000)
    assert capacities == [2 + 5]  # the prompt and the new tokens, not a million positions
    assert huge.text == run.generate("the cat", tokens=5, seed=1, context=7).text


def test_a_bpe_run_without_its_tokenizer_is_refused_at_start(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    neurallm.train(corpus, tmp_path / "bpe", progress=False, **{**TINY_MODEL, "level": "bpe", "bpe_vocab_size": 270})
    run = neurallm.load_run(tmp_path / "bpe")
    run.vocab.bpe = None  # as loaded from a folder whose tokenizer.json is gone
    with pytest.raises(ConfigError, match="tokenizer.json"):
        create_app(run, ServeConfig())


# --- clients that leave, Ctrl-C ---------------------------------------------------------------------------------


@pytest.fixture
def live(run):
    """A server on 127.0.0.1 whose generations can run long (--max-tokens 1,000,000); yields (port, app)."""
    app = create_app(run, ServeConfig(max_tokens=1_000_000, timeout=600))
    with serving(app) as port:
        yield port, app


def _send_and_leave(port: int, path: str, body: dict, *, read_first: bool = False) -> None:
    """Send a request over a raw connection, then close it (reading the first bytes of the answer if asked)."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        if read_first:
            conn.recv(200)
        else:
            time.sleep(0.5)


def _wait_idle(app, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not app.state.worker._admitted:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_stops_its_generation_streamed_or_not(live, caplog):
    port, app = live
    caplog.set_level(logging.ERROR)
    # a million tokens would hold the worker for minutes: each must stop once its client has gone
    for path, body in (("/api/generate", {"tokens": 1_000_000}), ("/v1/completions", {"prompt": "the", "max_tokens": 1_000_000}),
                       ("/api/generate/stream", {"tokens": 1_000_000}),
                       ("/v1/completions", {"prompt": "the", "max_tokens": 1_000_000, "stream": True})):
        _send_and_leave(port, path, body, read_first=body.get("stream", path.endswith("stream")))
        assert _wait_idle(app), f"{path} kept generating after its client left"
    gc.collect()
    time.sleep(0.2)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "never retrieved" not in logged and "Task was destroyed" not in logged, logged


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ctrl_c_with_a_request_in_flight_answers_503_without_a_traceback(trained_run):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "neurallm", "serve", str(trained_run), "--port", str(port),
                                "--max-tokens", "1000000", "--timeout", "600"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    answer: dict = {}

    def long_request():
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=json.dumps({"tokens": 1_000_000}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer["status"] = response.status
        except urllib.error.HTTPError as error:
            answer["status"], answer["body"] = error.code, json.loads(error.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.2)
        client = threading.Thread(target=long_request)
        client.start()
        time.sleep(1.0)  # the generation is running
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    client.join(timeout=60)
    assert answer.get("status") == 503 and "stopping" in answer["body"]["error"], (answer, output)
    assert "Traceback" not in output and process.returncode == 0, output


def test_a_stream_whose_time_ran_out_in_the_queue_ends_at_once_with_an_error(run, monkeypatch):
    from neurallm.server import calls

    monkeypatch.setattr(calls, "TIMEOUT_GRACE_SECONDS", 60.0)  # a stuck stream would wait a minute
    app = create_app(run, ServeConfig(timeout=0.3))
    release = threading.Event()
    app.state.worker.submit(release.wait, 10)  # holds the worker past the stream's deadline
    with TestClient(app, base_url="http://127.0.0.1") as client:
        timer = threading.Timer(1.0, release.set)
        timer.start()
        started = time.monotonic()
        answer = client.post("/api/generate/stream", json={"tokens": 3}).text
        waited = time.monotonic() - started
    assert "event: error" in answer and "--timeout" in answer
    assert waited < 30  # not the grace the server gives a stuck call
