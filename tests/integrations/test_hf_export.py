"""``neurallm export RUN --hf DIR``: transformers loads the folder with no custom code, and the loaded model and
tokenizer give neurallm's logits, greedy tokens and ids."""

from __future__ import annotations

import os

import pytest
import torch

import neurallm
from neurallm.cli import main
from neurallm.data.tokenizers import TokenizerSettings, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.generation import prompt_to_tokens
from neurallm.integrations.hf_export import export_hf
from neurallm.integrations.hf_tokenizer import build_tokenizer

from conftest import write_patterned_corpus

transformers = pytest.importorskip("transformers", reason="export --hf needs the 'hf' extra: pip install -e '.[hf]'")
pytestmark = pytest.mark.integration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRANSFORMER = dict(model="Transformer", emsize=16, nhid=32, nhead=2, nlayers=2, dropout=0.0, batch_size=4, bptt=16,
                   epochs=1, optimizer="adamw", lr=3e-3, eval_batch_size=2, seed=3)  # no output bias: the default
# several lines, a blank one, words not in the vocabulary, punctuation, a CRLF line end, an unfinished last line
TEXTS = ["the cat sat on the mat\n", "the zebra, the cat!\n\na dog ran (in the park)\r\nwe read", "",
         "\n", "  the   sun\tis hot  \n the bird\n", "x<unk>y <eos> the<eos>\n", "Ünïcödé wörds 😀 and the mat\n"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One tiny Transformer per tokenizer level (word untied, char and BPE tied), trained and exported."""
    root = tmp_path_factory.mktemp("hf-export")
    corpus = write_patterned_corpus(root / "corpus", lines=80)
    # punctuation and capitals in train, so that the character and BPE vocabularies hold some
    with open(corpus / "train.txt", "a", encoding="utf-8") as f:
        f.write("The Cat, the dog!\n(a park) the mat.\n")
    runs = {}
    for level, extra in (("word", {}), ("char", {"tied": True}), ("bpe", {"tied": True, "bpe_vocab_size": 300})):
        run_dir = root / level
        neurallm.train(corpus, run_dir, progress=False, level=level, **TRANSFORMER, **extra)
        export_hf(run_dir, root / f"{level}-hf")
        runs[level] = (run_dir, root / f"{level}-hf")
    return runs


def _load(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


@pytest.mark.parametrize("level", ["word", "char", "bpe"])
def test_the_loaded_model_gives_neurallms_logits(exported, level):
    run_dir, folder = exported[level]
    run = neurallm.load_run(run_dir, device="cpu")
    model, _ = _load(folder)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(run.vocab), (3, 40), generator=generator)  # (B, T): longer than the training bptt
    with torch.no_grad():
        features, _ = run.model.features(ids.t(), run.model.init_state(3))  # (T, B, C)
        ours = run.model.head.logits(features).transpose(0, 1)  # (B, T, V)
        theirs = model(ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("level, prompt", [("word", "the cat sat"), ("word", ""), ("char", "the ca"), ("bpe", "the dog")])
def test_greedy_generate_gives_neurallms_tokens(exported, level, prompt):
    run_dir, folder = exported[level]
    run = neurallm.load_run(run_dir, device="cpu")
    model, tokenizer = _load(folder)
    tokens = 12  # prompt and continuation stay within the context neurallm's generation attends to (bptt)
    ours = run.generate(prompt, tokens=tokens, temperature=0)
    prompt_ids = tokenizer(prompt).input_ids or [model.config.bos_token_id]  # empty: after a line break, as neurallm
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False)
    assert tokenizer.convert_ids_to_tokens(out[0, len(prompt_ids):].tolist()) == ours.generated_tokens


@pytest.mark.parametrize("level", ["word", "char", "bpe"])
def test_the_exported_tokenizer_gives_neurallms_ids(exported, level):
    run_dir, folder = exported[level]
    run = neurallm.load_run(run_dir, device="cpu")
    _, tokenizer = _load(folder)
    for text in TEXTS:
        expected = run.vocab.encode(prompt_to_tokens(text, run.config.tokenizer, run.vocab.bpe))[0]
        assert tokenizer(text).input_ids == expected, text
        if text.endswith("\n"):  # a text ending in a line break: exactly the tokens `neurallm score` reads
            scored = run.score([text])[0].tokens
            assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) == \
                [t if t in run.vocab.index else "<unk>" for t in scored], text


def test_the_word_tokenizer_decodes_to_neurallms_text(exported):
    run_dir, folder = exported["word"]
    run = neurallm.load_run(run_dir, device="cpu")
    _, tokenizer = _load(folder)
    result = run.generate("the cat\n", tokens=20, temperature=0)
    ids = tokenizer(result.text).input_ids
    assert tokenizer.decode(ids) == result.text


@pytest.mark.parametrize("lowercase, strip", [(True, False), (False, True), (True, True)])
def test_lowercase_and_strip_punctuation_give_neurallms_ids(tmp_path, lowercase, strip):
    settings = TokenizerSettings(level="word", lowercase=lowercase, strip_punctuation=strip)
    vocab = Vocab(["<unk>", "<eos>", "the", "cat", "well", "known", "sat", "mat", "The", "cat,", "x"])
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(vocab, settings))
    wrapped.save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = TEXTS + ["The Cat, well-known; sat... on <UNK> the MAT\n", "x<eos>y <unk>! (the) cat,\n", "a_b c--d\n"]
    for text in texts:
        expected = [t for line in text.splitlines() for t in tokenize_line(line, settings)]
        if not text.endswith("\n"):
            expected = expected[:-1]
        assert tokenizer(text).input_ids == vocab.encode(expected)[0], text


def test_a_transformer_with_an_output_bias_is_refused_naming_the_fix(tmp_path, capsys):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    neurallm.train(corpus, tmp_path / "run", progress=False, **{**TRANSFORMER, "output_bias": True})
    capsys.readouterr()  # what training logged (its small-split warnings)
    assert main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--no-output-bias" in err and "--onnx" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_models_without_a_counterpart_are_refused_naming_onnx(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--hf", str(tmp_path / "hf")]) == 1  # an LSTM
    err = capsys.readouterr().err.strip()
    assert "--onnx" in err and "LSTM" in err and len(err.splitlines()) == 1


def test_a_transformer_with_memory_is_refused_naming_onnx(tmp_path):
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    neurallm.train(corpus, tmp_path / "run", progress=False, **{**TRANSFORMER, "memory": 8})
    with pytest.raises(ConfigError, match="--memory 8.*--onnx"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_the_output_folder_must_be_new_empty_or_a_previous_export(exported, tmp_path, capsys):
    run_dir, folder = exported["word"]
    assert main(["export", str(run_dir), "--hf", str(run_dir)]) == 1  # a run folder
    assert "run folder" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), "--hf", str(busy)]) == 1
    assert "notes.txt" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run_dir), "--hf", str(empty)]) == 0
    assert main(["export", str(run_dir), "--hf", str(empty)]) == 0  # writing over a previous export
    assert sorted(p.name for p in empty.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
