"""The lm-evaluation-harness model ``neurallm``: the harness's numbers are neurallm's own, on a local task."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neurallm
from neurallm.cli import main

pytest.importorskip("lm_eval", reason="the lm-eval model needs the 'eval' extra: pip install -e '.[eval]'")
pytestmark = pytest.mark.integration

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)

# whole documents of several lines, with words the vocabulary lacks, one without a final line break
DOCUMENTS = ["the cat sat on the mat\nthe dog ran in the park\n",
             "we read the book today\n\nthe zebra is hot and bright\na bird sang\n",
             "the sun is hot and bright, the cat sat"]


def _task_folder(folder: Path, name: str, output_type: str, records: list[dict], extra: str) -> Path:
    """A harness task over a local JSONL file (the datasets library's json builder: nothing downloaded)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"output_type: {output_type}\ntest_split: test\n{extra}", encoding="utf-8")
    return folder


PERPLEXITY_TASK = ('doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
                   "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def _expected_word_perplexity(run_dir: Path, tmp_path: Path, capsys) -> float:
    """exp(-Σ log-probs / Σ words): log-probs from `neurallm score --json`, words counted as the harness does."""
    total = 0.0
    for i, doc in enumerate(DOCUMENTS):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(doc, encoding="utf-8")
        capsys.readouterr()
        assert main(["score", str(run_dir), "--file", str(path), "--json"]) == 0
        total += sum(json.loads(line)["logprob"] for line in capsys.readouterr().out.splitlines())
    words = sum(len(re.split(r"\s+", doc)) for doc in DOCUMENTS)  # lm_eval.api.task's count_words
    return math.exp(-total / words)


def test_word_perplexity_from_the_harness_equals_neurallm_score(trained_run, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import neurallm.integrations.lm_eval  # noqa: F401  (registers the model)

    tasks = _task_folder(tmp_path / "tasks", "neurallm_docs", "loglikelihood_rolling",
                         [{"text": doc} for doc in DOCUMENTS], PERPLEXITY_TASK)
    results = lm_eval.simple_evaluate(model="neurallm", model_args=f"run={trained_run}", tasks=["neurallm_docs"],
                                      task_manager=TaskManager(include_path=str(tasks)))
    measured = results["results"]["neurallm_docs"]["word_perplexity,none"]
    assert measured == pytest.approx(_expected_word_perplexity(trained_run, tmp_path, capsys), rel=1e-6)


def test_loglikelihood_and_greedy_match_the_model_run_directly(trained_run):
    from lm_eval.api.instance import Instance

    from neurallm.integrations.lm_eval import NeurallmLM

    lm = NeurallmLM(run=str(trained_run), device="cpu")
    run = lm.run
    pairs = [("the cat sat on", " the mat"), ("", "the dog ran"), ("we read the book", "\nthe sun is"),
             ("the zebra", " sat on the")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    answers = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, answers):
        # the reference: the LSTM run over <eos> + context + continuation in one pass, read at the continuation
        context_ids = run.vocab.encode(context.split())[0]
        lines = (context + continuation).split("\n")
        whole = [t for line in lines[:-1] for t in line.split() + ["<eos>"]] + lines[-1].split()
        whole_ids = run.vocab.encode(whole)[0]
        ids = torch.tensor([run.vocab.index["<eos>"]] + whole_ids).view(-1, 1)
        with torch.no_grad():
            features, _ = run.model.features(ids[:-1], run.model.init_state(1))
            log_probs = run.model.head.log_probs(features[:, 0])  # (T, V)
        targets = ids[1:, 0]
        span = range(len(context_ids), len(whole_ids))
        assert logprob == pytest.approx(sum(float(log_probs[t, targets[t]]) for t in span), abs=1e-5)
        assert greedy == all(int(log_probs[t].argmax()) == int(targets[t]) for t in span)
    # a greedy continuation is recognised as one
    made = run.generate("the cat", tokens=3, temperature=0).generated_tokens
    (_, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("the cat", " " + " ".join(made)), 0)])
    assert greedy


def test_loglikelihood_rolling_is_neurallm_score(trained_run):
    from lm_eval.api.instance import Instance

    from neurallm.integrations.lm_eval import NeurallmLM

    lm = NeurallmLM(run=str(trained_run), device="cpu")
    requests = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(DOCUMENTS)]
    assert lm.loglikelihood_rolling(requests) == [score.logprob for score in lm.run.score(DOCUMENTS)]


def test_generate_until_is_neurallm_generate_cut_at_the_stop_string(trained_run):
    from lm_eval.api.instance import Instance

    from neurallm.integrations.lm_eval import NeurallmLM

    lm = NeurallmLM(run=str(trained_run), device="cpu")
    full = lm.run.generate("the cat", tokens=30, temperature=0).text[len("the cat"):]
    stop = full.split()[3]  # a word that occurs in the continuation
    (text,) = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": [stop], "max_gen_toks": 30}), 0)])
    assert text == full[: full.index(stop)] and stop not in text
    (text,) = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["no such"], "max_gen_toks": 30}), 0)])
    assert text == full


def test_unknown_model_args_are_one_line(trained_run):
    from neurallm.errors import ConfigError
    from neurallm.integrations.lm_eval import NeurallmLM

    with pytest.raises(ConfigError, match="unknown model_args for neurallm: pretrained"):
        NeurallmLM(run=str(trained_run), pretrained="gpt2")


def test_neurallm_lm_eval_runs_the_harness_command_line(trained_run, tmp_path, capsys):
    tasks = _task_folder(tmp_path / "tasks", "neurallm_docs_cli", "loglikelihood_rolling",
                         [{"text": doc} for doc in DOCUMENTS], PERPLEXITY_TASK)
    out = tmp_path / "results"
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "neurallm", "lm-eval", str(trained_run), "--tasks", "neurallm_docs_cli",
                           "--include-path", str(tasks), "--output_path", str(out), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result_file,) = out.rglob("results_*.json")
    measured = json.loads(result_file.read_text())["results"]["neurallm_docs_cli"]["word_perplexity,none"]
    assert measured == pytest.approx(_expected_word_perplexity(trained_run, tmp_path, capsys), rel=1e-6)


def test_importing_neurallm_does_not_import_the_harness():
    code = "import sys, neurallm, neurallm.cli; print('lm_eval' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr
