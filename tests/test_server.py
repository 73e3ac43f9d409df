"""The HTTP API of `neurallm serve`, through FastAPI's TestClient: answers, validation, the queue, time-outs."""

from __future__ import annotations

import builtins
import json
import math
import threading

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import neurallm  # noqa: E402
from neurallm.config import ServeConfig  # noqa: E402
from neurallm.generation import Piece, TokenChoice  # noqa: E402
from neurallm.scoring import score_texts  # noqa: E402
from neurallm.server.app import create_app  # noqa: E402

MAX_TOKENS = 30
BASE_URL = "http://127.0.0.1"  # a Host the server answers (it refuses names it was not bound under)


@pytest.fixture(scope="module")
def run(trained_run):
    return neurallm.load_run(trained_run)


@pytest.fixture(scope="module")
def client(run):
    with TestClient(create_app(run, ServeConfig(max_tokens=MAX_TOKENS, max_prompt_chars=200)), base_url=BASE_URL) as c:
        yield c


def _events(body: str) -> list[tuple[str, dict]]:
    """Parse a server-sent-event stream into (event, data) pairs."""
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# --- answers -----------------------------------------------------------------------------------------------


def test_healthz_and_the_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="tokens"', 'id="temperature"', 'id="top_k"', 'id="top_p"', 'id="seed"', ">Generate<"):
        assert element in page.text


def test_info_gives_the_models_facts_from_the_run(client, run, trained_run):
    info = client.get("/api/info").json()
    results = json.loads((trained_run / "results.json").read_text())
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert info["model"] == "LSTM" and info["level"] == "word" and info["vocabulary"] == len(run.vocab)
    assert info["parameters"] == sum(p.numel() for p in run.model.parameters())
    assert info["test"] == {"name": "ppl", "value": results["test"]["ppl"], "split": "test"}
    assert info["epochs"] == 2
    assert info["training_seconds"] == pytest.approx(sum(r["seconds"] for r in metrics), abs=0.06)
    assert info["limits"]["max_tokens"] == MAX_TOKENS


def test_generate_answers_what_the_library_generates(client, run):
    body = {"prompt": "the cat", "tokens": 12, "temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 3}
    answer = client.post("/api/generate", json=body).json()
    expected = run.generate("the cat", tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert answer["text"] == expected.text and answer["tokens"] == 12
    assert answer["prompt_unknown"] == [] and answer["seconds"] > 0
    assert client.post("/api/generate", json=body).json()["text"] == answer["text"]  # same seed, same text


def test_generate_names_the_prompt_words_outside_the_vocabulary(client):
    answer = client.post("/api/generate", json={"prompt": "the zebra and the quokka sat", "tokens": 3}).json()
    assert answer["prompt_unknown"] == ["zebra", "quokka"]


@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_an_error(client, temperature):
    greedy = client.post("/api/generate", json={"tokens": 8, "temperature": 0}).json()["text"]
    answer = client.post("/api/generate", json={"tokens": 8, "temperature": temperature})
    assert answer.status_code == 200 and answer.json()["text"] == greedy


def test_all_fields_have_defaults(client):
    answer = client.post("/api/generate", json={}).json()
    assert answer["tokens"] == MAX_TOKENS  # the default (100) capped by --max-tokens


def test_the_stream_sends_one_event_per_token_then_the_generate_answer(client):
    body = {"prompt": "the dog", "tokens": 15, "seed": 5}
    response = client.post("/api/generate/stream", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [name for name, _ in events] == ["token"] * 15 + ["done"]
    done = events[-1][1]
    plain = client.post("/api/generate", json=body).json()
    assert {k: v for k, v in done.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}
    assert "the dog" + "".join(data["text"] for _, data in events[:-1]) == done["text"]


def test_score_gives_per_token_log_probabilities_total_loss_and_perplexity(client, run):
    text = "the cat sat on the mat\nthe zebra ran"
    answer = client.post("/api/score", json={"text": text}).json()
    (expected,) = score_texts(run.model, run.vocab, run.config.tokenizer, [text], bptt=run.config.train.bptt)
    assert [t["token"] for t in answer["tokens"]] == "the cat sat on the mat <eos> the zebra ran <eos>".split()
    assert [t["logprob"] for t in answer["tokens"]] == pytest.approx(expected.logprobs)
    assert [t["unknown"] for t in answer["tokens"]].count(True) == answer["unknown"] == 1
    assert answer["total_loss"] == pytest.approx(-sum(expected.logprobs))
    assert answer["loss"] == pytest.approx(answer["total_loss"] / answer["token_count"])
    assert answer["ppl"] == pytest.approx(math.exp(answer["loss"]))


def test_the_openapi_schema_shows_the_endpoints_and_the_caps(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/generate", "/api/generate/stream", "/api/score", "/api/info", "/healthz"} <= set(schema["paths"])
    generate = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert generate["tokens"]["maximum"] == MAX_TOKENS and generate["prompt"]["maxLength"] == 200


def test_no_request_reads_or_writes_a_file(client, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a request opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    for method, path, body in [("get", "/", None), ("get", "/api/info", None), ("get", "/healthz", None),
                               ("post", "/api/generate", {"tokens": 5}), ("post", "/api/generate/stream", {"tokens": 5}),
                               ("post", "/api/score", {"text": "the cat"})]:
        response = client.request(method.upper(), path, json=body)
        assert response.status_code == 200, (path, response.text)


# --- bad requests: a 4xx with a JSON error, never a 500 ----------------------------------------------------

MALFORMED = [
    ("{", 400), ('{"tokens": 5', 400), ("not json", 400), ("", 422), ("null", 422), ("[]", 422), ('"text"', 422),
    ('{"tokens": 31}', 422), ('{"tokens": 1000000000000}', 422), ('{"tokens": 0}', 422), ('{"tokens": -5}', 422),
    ('{"tokens": "5"}', 422), ('{"tokens": 5.5}', 422), ('{"tokens": true}', 422), ('{"tokens": null}', 422),
    ('{"temperature": -1}', 422), ('{"temperature": NaN}', 422), ('{"temperature": Infinity}', 422),
    ('{"temperature": "hot"}', 422), ('{"top_k": 0}', 422), ('{"top_p": 0}', 422), ('{"top_p": 1.5}', 422),
    ('{"seed": -1}', 422), ('{"seed": 99999999999999999999999}', 422), ('{"prompt": 5}', 422),
    ('{"prompt": ["a"]}', 422), ('{"prompt": "' + "x" * 201 + '"}', 422), ('{"max_tokens": 5}', 422),
    ('{"prompt": {"nested": [1, 2, {"deep": null}]}}', 422), ('{"tokens": 5, "tokens": 500}', 422),
    ('{"prompt": "a lone surrogate \\ud800 cannot be sent back as UTF-8"}', 422), ("[" * 2000 + "]" * 2000, 400),
]


@pytest.mark.parametrize("body,status", MALFORMED)
def test_a_malformed_generate_request_gets_a_4xx_json_error(client, body, status):
    for path in ("/api/generate", "/api/generate/stream"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert isinstance(error, str) and error and "\n" not in error


@pytest.mark.parametrize("body", ["{}", '{"text": ""}', '{"text": 5}', '{"text": "' + "x" * 201 + '"}', '{"texts": ["a"]}', "{"])
def test_a_malformed_score_request_gets_a_4xx_json_error(client, body):
    response = client.post("/api/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422) and response.json()["error"]


def test_oversized_tokens_name_the_field_and_the_cap(client):
    response = client.post("/api/generate", json={"tokens": MAX_TOKENS + 1})
    assert response.status_code == 422
    assert response.json()["error"] == f"tokens: Input should be less than or equal to {MAX_TOKENS}"


def test_wrong_content_type_paths_and_methods_are_4xx_json(client):
    form = client.post("/api/generate", content="prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and form.json()["error"]
    assert client.get("/api/nothing").status_code == 404 and client.get("/api/nothing").json()["error"]
    assert client.get("/api/generate").status_code == 405 and client.get("/api/generate").json()["error"]


def test_a_body_over_the_cap_is_refused_before_it_is_read(client):
    declared = client.post("/api/generate", content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "--max-prompt-chars" in declared.json()["error"]
    chunked = client.post("/api/generate", content=iter([b"x" * 10_000] * 10), headers={"content-type": "application/json"})
    assert chunked.status_code == 413


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(
    st.sampled_from(["prompt", "tokens", "temperature", "top_k", "top_p", "seed", "text", "other"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=250),
              st.lists(st.integers(), max_size=3)),
    max_size=6,
))
def test_any_json_object_gets_an_answer_never_a_500(client, body):
    for path in ("/api/generate", "/api/score"):
        response = client.post(path, json=body)
        assert response.status_code in (200, 422), (path, body, response.text)
        assert isinstance(response.json(), dict)


# --- several requests at once ------------------------------------------------------------------------------


def _blocked_app(run, **limits):
    """An app whose model worker is held by a call that waits for the returned event, and an event set once that
    call has finished and given its queue slot back."""
    app = create_app(run, ServeConfig(max_tokens=MAX_TOKENS, **limits))
    release, drained = threading.Event(), threading.Event()
    blocker = app.state.worker.submit(release.wait, 10)
    blocker.add_done_callback(lambda _: drained.set())  # runs after the worker's own callback, which frees the slot
    return app, release, drained


def test_a_full_queue_answers_503_with_retry_after_and_serves_again_when_it_drains(run):
    app, release, drained = _blocked_app(run, max_queue=1)
    with TestClient(app, base_url=BASE_URL) as client:
        for path, body in [("/api/generate", {"tokens": 3}), ("/api/generate/stream", {"tokens": 3}), ("/api/score", {"text": "a"})]:
            busy = client.post(path, json=body)
            assert busy.status_code == 503, path
            assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]
        release.set()
        assert drained.wait(10)
        assert client.post("/api/generate", json={"tokens": 3}).status_code == 200


def test_a_request_that_waits_past_the_timeout_gets_504(run):
    app, release, _ = _blocked_app(run, max_queue=4, timeout=0.2)
    try:
        with TestClient(app, base_url=BASE_URL) as client:
            response = client.post("/api/generate", json={"tokens": 3})
            assert response.status_code == 504 and "--timeout" in response.json()["error"]
    finally:
        release.set()


def test_a_failure_during_a_stream_ends_it_with_an_error_event(run, monkeypatch):
    from neurallm.server import app as server_app

    def broken(*args, **kwargs):
        yield Piece("the", TokenChoice(0, "the", -1.0, [], 0))
        raise RuntimeError("simulated bug")

    app = create_app(run, ServeConfig(max_tokens=MAX_TOKENS))
    monkeypatch.setattr(server_app, "stream_generation", broken)
    with TestClient(app, base_url=BASE_URL) as client:
        events = _events(client.post("/api/generate/stream", json={"tokens": 5}).text)
    assert [name for name, _ in events] == ["token", "error"]
    assert events[-1][1]["error"] == "internal error (RuntimeError); the server log has the details"


def test_score_warns_as_neurallm_score_does_when_many_tokens_are_unknown(client, monkeypatch):
    from neurallm import api

    warnings = []
    monkeypatch.setattr(api.logger, "warning", lambda message, *args, **kwargs: warnings.append(message))
    assert client.post("/api/score", json={"text": "the cat sat on the mat"}).status_code == 200
    assert warnings == []
    assert client.post("/api/score", json={"text": "the quokka and zebra wombat"}).status_code == 200
    assert len(warnings) == 1 and "<unk>" in warnings[0]
