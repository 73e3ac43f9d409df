"""`neurallm serve` over real HTTP: uvicorn on 127.0.0.1, several clients at once, the streamed tokens, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_eight_concurrent_requests_all_succeed_with_their_own_text(live_server):
    bodies = [{"prompt": "the cat", "tokens": 20, "seed": seed} for seed in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: _post(live_server + "/api/generate", body), bodies))
    assert [status for status, _ in answers] == [200] * 8
    # serialised model calls: each answer is what the same request gets alone
    for body, (_, answer) in zip(bodies[:3], answers[:3]):
        assert _post(live_server + "/api/generate", body)[1]["text"] == answer["text"]
    assert len({answer["text"] for _, answer in answers}) > 1


def test_generate_stream_and_score_at_once(live_server):
    jobs = [("/api/generate", {"tokens": 10}), ("/api/score", {"text": "the cat sat on the mat"}),
            ("/api/generate/stream", {"tokens": 10})] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        statuses = list(pool.map(lambda job: _stream_or_post(live_server + job[0], job[1]), jobs))
    assert statuses == [200] * len(jobs)


def _stream_or_post(url: str, body: dict) -> int:
    if not url.endswith("/stream"):
        return _post(url, body)[0]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    assert text.count("event: token") == body["tokens"] and "event: done" in text
    return response.status


def test_tokens_arrive_one_event_at_a_time(live_server):
    request = urllib.request.Request(live_server + "/api/generate/stream", data=json.dumps({"tokens": 50}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline().decode()  # the first event is readable before the generation ends
        rest = response.read().decode()
    assert first == "event: token\n"
    assert rest.count("event: token") == 49 and rest.rstrip().splitlines()[-2] == "event: done"


def test_malformed_json_and_oversized_tokens_over_http_are_4xx(live_server):
    request = urllib.request.Request(live_server + "/api/generate", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=30)
    assert malformed.value.code == 400 and json.loads(malformed.value.read())["error"]
    status, answer = _post(live_server + "/api/generate", {"tokens": 10_000})
    assert status == 422 and answer["error"].startswith("tokens:")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_the_serve_command_listens_on_127_0_0_1_and_stops_on_ctrl_c(trained_run):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "neurallm", "serve", str(trained_run), "--port", str(port), "--max-tokens", "5"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    assert json.loads(response.read()) == {"status": "ok"}
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.2)
        assert _post(f"http://127.0.0.1:{port}/api/generate", {"tokens": 6})[0] == 422  # --max-tokens 5
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output
    assert f"at http://127.0.0.1:{port}/" in output


def test_serve_on_a_port_in_use_is_one_clean_line(trained_run, capsys):
    from neurallm.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurallm serve: error: cannot listen on --host 127.0.0.1 --port") and "\n" not in err


def test_serve_without_the_serve_extra_names_the_package_to_install(trained_run, monkeypatch, capsys):
    import builtins

    from neurallm.cli import main

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    assert main(["serve", str(trained_run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurallm serve: error:") and "pip install 'neurallm[serve]'" in err and "\n" not in err
