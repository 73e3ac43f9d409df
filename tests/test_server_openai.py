"""The OpenAI-compatible endpoints of `neurallm serve`: the official `openai` client against a live server, the
echo log-probabilities against `neurallm score`, and the one generation route behind every door."""

from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

import neurallm  # noqa: E402
from neurallm.config import ServeConfig  # noqa: E402
from neurallm.server.app import create_app  # noqa: E402

from conftest import TINY_MODEL, serving, write_patterned_corpus  # noqa: E402

BASE_URL = "http://127.0.0.1"
TEXT = "the cat sat on the mat\nthe zebra ran in the park\n"  # "zebra" is not in the vocabulary


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run) -> dict:
    """The LSTM run of the session, and a GRU, a BPE Transformer and a Transformer with memory, each trained briefly."""
    root = tmp_path_factory.mktemp("openai-runs")
    corpus = write_patterned_corpus(root / "corpus", lines=60)
    found = {"lstm": trained_run}
    for name, extra in (("gru", dict(model="GRU")),
                        ("bpe-transformer", dict(model="Transformer", nhead=2, level="bpe", bpe_vocab_size=280)),
                        ("memory-transformer", dict(model="Transformer", nhead=2, memory=8))):
        neurallm.train(corpus, root / name, progress=False, **{**TINY_MODEL, **extra})
        found[name] = root / name
    return found


def _client(run_dir, **settings) -> TestClient:
    return TestClient(create_app(neurallm.load_run(run_dir), ServeConfig(max_tokens=64, **settings)), base_url=BASE_URL)


@pytest.mark.parametrize("name", ["lstm", "gru", "bpe-transformer", "memory-transformer"])
def test_echo_logprobs_equal_neurallm_score(runs, name):
    run = neurallm.load_run(runs[name])
    (scored,) = run.score([TEXT])
    with _client(runs[name]) as client:
        answer = client.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    (choice,) = answer["choices"]
    logprobs = choice["logprobs"]
    assert choice["text"] == TEXT
    assert len(logprobs["token_logprobs"]) == len(scored.tokens) and logprobs["token_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(scored.logprobs[1:], rel=1e-9, abs=1e-12)
    assert logprobs["top_logprobs"][0] is None
    for value, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
        assert max(top.values()) >= value  # the most likely alternative is at least as likely as the token
    assert answer["usage"] == {"prompt_tokens": len(scored.tokens), "completion_tokens": 0, "total_tokens": len(scored.tokens)}
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


@pytest.mark.parametrize("name", ["lstm", "memory-transformer"])
def test_the_server_and_the_library_give_the_same_text_for_the_same_seed(runs, name):
    run = neurallm.load_run(runs[name])
    expected = run.generate("the cat", tokens=20, temperature=0.9, top_k=8, seed=42)
    with _client(runs[name]) as client:
        page = client.post("/api/generate", json={"prompt": "the cat", "tokens": 20, "temperature": 0.9, "top_k": 8, "seed": 42}).json()
        openai = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 20, "temperature": 0.9, "top_k": 8,
                                                       "seed": 42, "echo": True}).json()
    assert page["text"] == expected.text
    assert openai["choices"][0]["text"] == expected.text


def test_the_cli_writes_what_the_server_answers(runs, tmp_path, capsys):
    from neurallm.cli import main

    out = tmp_path / "g.txt"
    assert main(["generate", str(runs["memory-transformer"]), "--prompt", "the dog", "--tokens", "15", "--seed", "9",
                 "--out", str(out)]) == 0
    with _client(runs["memory-transformer"]) as client:
        answer = client.post("/api/generate", json={"prompt": "the dog", "tokens": 15, "seed": 9}).json()
    assert out.read_text(encoding="utf-8") == answer["text"]


def test_token_id_prompts_and_the_tokenize_endpoints(runs):
    run = neurallm.load_run(runs["lstm"])
    with _client(runs["lstm"]) as client:
        tokenized = client.post("/tokenize", json={"prompt": "the cat sat\n", "add_special_tokens": False}).json()
        assert tokenized["tokens"] == [run.vocab.index[t] for t in ("the", "cat", "sat", "<eos>")]
        assert tokenized["count"] == 4
        assert client.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": "the cat sat\n"}
        info = client.get("/tokenizer_info").json()
        # lm-evaluation-harness finds the end-of-text id as tokenize(eos_token)[0]
        eos = client.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
        assert eos == [run.vocab.index["<eos>"]]
        by_text = client.post("/v1/completions", json={"prompt": "the cat sat", "max_tokens": 5, "seed": 1}).json()
        by_ids = client.post("/v1/completions", json={"prompt": tokenized["tokens"][:3], "max_tokens": 5, "seed": 1}).json()
        assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
        batch = client.post("/v1/completions", json={"prompt": [tokenized["tokens"][:3], tokenized["tokens"][:2]],
                                                     "max_tokens": 3, "seed": 1, "n": 2}).json()
        assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
        assert batch["choices"][0]["text"] == by_text["choices"][0]["text"][: len(batch["choices"][0]["text"])]
        texts = client.post("/v1/completions", json={"prompt": ["the cat sat", "the cat"], "max_tokens": 3, "seed": 1}).json()
        assert [c["text"] for c in texts["choices"]] == [batch["choices"][0]["text"], batch["choices"][2]["text"]]
        bad = client.post("/detokenize", json={"tokens": [len(run.vocab)]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_errors_have_the_openai_shape(runs):
    with _client(runs["lstm"]) as client:
        for response in (client.post("/v1/completions", json={"prompt": "a", "temperature": "hot"}),
                         client.post("/v1/completions", json={"prompt": "a", "max_tokens": 10_000}),
                         client.post("/v1/completions", json={"prompt": "a", "presence_penalty": 1.0}),
                         client.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}),
                         client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
                         client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}),
                         client.get("/v1/nothing")):
            assert 400 <= response.status_code < 500, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        chat = client.post("/v1/chat/completions", json={"messages": []}).json()["error"]["message"]
        assert "chat template" in chat and "/v1/completions" in chat


def test_an_api_key_is_required_only_when_given(runs):
    with _client(runs["lstm"]) as open_server:
        assert open_server.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
    with _client(runs["lstm"], api_key="s3cret") as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/tokenize", json={"prompt": "a"}).status_code == 401
        assert client.get("/healthz").status_code == 200  # the page's routes stay open


# --- the official client against a live server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def live_openai(runs):
    """The LSTM run served by uvicorn on 127.0.0.1 with --api-key, in a thread; yields the base URL."""
    app = create_app(neurallm.load_run(runs["lstm"]), ServeConfig(max_tokens=64, api_key="test-key"))
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_official_openai_client(live_openai, runs):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live_openai + "/v1", api_key="test-key", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == runs["lstm"].name

    run = neurallm.load_run(runs["lstm"])
    completion = client.completions.create(model=model.id, prompt="the cat", max_tokens=12, temperature=0.8, seed=5)
    expected = run.generate("the cat", tokens=12, temperature=0.8, seed=5)
    assert "the cat" + completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == 12 and completion.choices[0].finish_reason == "length"

    pieces, finish = [], None
    for chunk in client.completions.create(model="any-name", prompt="the cat", max_tokens=12, temperature=0.8, seed=5,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == completion.choices[0].text and finish == "length"

    echoed = client.completions.create(model=model.id, prompt=TEXT, max_tokens=0, echo=True, logprobs=2)
    (scored,) = run.score([TEXT])
    assert echoed.choices[0].logprobs.token_logprobs[1:] == pytest.approx(scored.logprobs[1:])

    greedy = run.generate("the cat", tokens=30, temperature=0).text[len("the cat"):]
    stop = greedy.split()[3]  # a word the greedy text makes: the text ends before it
    stopped = client.completions.create(model=model.id, prompt="the cat", max_tokens=30, temperature=0, stop=[" " + stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[: greedy.index(" " + stop)]

    several = client.completions.create(model=model.id, prompt="the", max_tokens=8, n=3, seed=1)
    assert len(several.choices) == 3 and len({c.text for c in several.choices}) > 1

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_openai + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "hi"}])


def test_serve_takes_the_api_key_from_the_environment(trained_run, monkeypatch):
    from neurallm import cli

    seen = {}
    monkeypatch.setattr("neurallm.server.serve", lambda run, settings, **kw: seen.setdefault("settings", settings))
    monkeypatch.setenv("NEURALLM_API_KEY", "from-env")
    assert cli.main(["serve", str(trained_run)]) == 0
    assert seen["settings"].api_key == "from-env"
    seen.clear()
    assert cli.main(["serve", str(trained_run), "--api-key", "typed"]) == 0
    assert seen["settings"].api_key == "typed"


def test_lm_evaluation_harness_local_completions_uses_the_servers_tokenizer(live_openai, runs, tmp_path, monkeypatch):
    """The harness's `local-completions` model with `tokenizer_backend=remote`: it tokenizes through /tokenize, finds
    the end-of-text id through /tokenizer_info, and scores through echo. Its word perplexity is what neurallm's
    scoring gives for each document read after the harness's end-of-text token."""
    pytest.importorskip("tenacity", reason="local-completions needs lm-eval's 'api' extra")
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (registers the harness's own models, local-completions among them)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    from lm_eval.tasks import TaskManager

    documents = ["the cat sat on the mat", "the dog ran in the zebra park"]
    (tmp_path / "test.txt").write_text("\n".join(documents) + "\n", encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(
        "task: neurallm_server_ppl\ndataset_path: text\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'test.txt'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n", encoding="utf-8")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["neurallm_server_ppl"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f"model=x,base_url={live_openai}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
                   "num_concurrent=1,auth_token=test-key")  # the tokenizer endpoints' key; completions read OPENAI_API_KEY
    measured = results["results"]["neurallm_server_ppl"]["word_perplexity,none"]
    run = neurallm.load_run(runs["lstm"])
    total = 0.0
    for document in documents:  # the harness reads each document after its end-of-text token ("\n"), no final "\n"
        (scored,) = run.score(["\n" + document])
        total += scored.lines[1].logprob - scored.lines[1].logprobs[-1]
    words = sum(len(d.split()) for d in documents)
    assert measured == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_a_streamed_completion_adds_up_to_the_plain_one_logprobs_included(runs):
    body = {"prompt": "the cat", "max_tokens": 10, "seed": 4, "echo": True, "logprobs": 2, "n": 2}
    with _client(runs["lstm"]) as client:
        plain = client.post("/v1/completions", json=body).json()
        events = client.post("/v1/completions", json={**body, "stream": True,
                                                     "stream_options": {"include_usage": True}}).text.strip().split("\n\n")
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert chunks[-1]["usage"] == plain["usage"] and chunks[-1]["choices"] == []
    for choice in plain["choices"]:
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        streamed = [c["logprobs"] for c in mine if c["logprobs"]]
        generated = len(streamed)  # one chunk per generated token; the echoed prompt comes first, without
        assert [lp["text_offset"][0] for lp in streamed] == choice["logprobs"]["text_offset"][-generated:]
        assert [lp["token_logprobs"][0] for lp in streamed] == choice["logprobs"]["token_logprobs"][-generated:]
