"""A run's tokenizer as a Hugging Face ``tokenizers`` object that gives exactly neurallm's ids.

What "exactly" means: a text becomes the tokens :func:`neurallm.generation.prompt_to_tokens` makes of it, which
are the tokens ``neurallm score`` reads for a text that ends with a line break. A line break (any that
``str.splitlines`` knows, ``\\r\\n`` as one) is the end-of-line token and nothing is added at the end of the text:

* ``word``: a normalizer writes each line break as `` <eos> ``, the text is split on whitespace and each word is
  looked up in the vocabulary (a word-level model; unknown words become ``<unk>``). ``--lowercase`` and
  ``--strip-punctuation`` are normalizers too; the literal markers ``<unk>`` and ``<eos>`` survive stripping, as
  in :func:`neurallm.data.tokenizers.tokenize_line` (they are set aside before and put back after);
* ``char``: every character is a token, every line break the token ``"\\n"``;
* ``bpe``: the run's own byte-level BPE (already a ``tokenizers`` file); it encodes a text in one piece where
  neurallm encodes it line by line, which gives the same tokens because no learned merge starts with the line
  break (training encodes ``line + "\\n"``, the line break always last).

Two known differences, both outside what a WikiText-style corpus holds: ``str.lower`` writes a Greek capital
sigma at a word's end as ``ς`` where ``tokenizers`` writes ``σ``, and the two libraries disagree on the case of a
few dozen letters added in Unicode 16.

The special tokens are left out of the tokenizer's "added tokens" on purpose: added tokens are cut out of the
text before it is split, so ``x<eos>y`` would become three tokens where neurallm reads one (unknown) word.
"""

from __future__ import annotations

import string

from neurallm.data.tokenizers import EOS, UNK, TokenizerSettings
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError

# every line break str.splitlines() splits on, \r\n first so that it counts once
LINE_BREAKS = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]"
# private-use characters that hold the markers while punctuation is stripped
_HELD = {UNK: "\ue000", EOS: "\ue001"}


def line_break_text(level: str) -> str:
    """What a line break stands for at ``level`` ``word`` or ``char`` (the token a document starts after)."""
    return EOS if level == "word" else "\n"


def build_tokenizer(vocab: Vocab, settings: TokenizerSettings):
    """A ``tokenizers.Tokenizer`` that encodes text to ``vocab``'s ids the way the run does (module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    steps = [normalizers.Lowercase()] if settings.lowercase else []
    if settings.level == "bpe":
        if vocab.bpe is None:
            raise ConfigError("this BPE run has no tokenizer.json beside vocab.json; the run directory is incomplete")
        if vocab.bpe.vocabulary() != vocab.tokens:
            raise ConfigError("this run's vocab.json does not list its tokenizer.json's tokens in id order; "
                              "the run directory is inconsistent")
        tokenizer = Tokenizer.from_str(vocab.bpe.to_json())
        if steps:
            tokenizer.normalizer = normalizers.Sequence(steps)
        return tokenizer
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    if settings.level == "char":
        steps.append(normalizers.Replace(Regex(LINE_BREAKS), "\n"))
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per character
        tokenizer.decoder = decoders.Fuse()
        return tokenizer
    if settings.strip_punctuation:
        punctuation = "".join("\\" + c for c in string.punctuation)
        steps += [normalizers.Replace(marker, held) for marker, held in _HELD.items()]
        steps.append(normalizers.Replace(Regex(f"[{punctuation}]+"), " "))
        steps += [normalizers.Replace(held, marker) for marker, held in _HELD.items()]
    steps.append(normalizers.Replace(Regex(LINE_BREAKS), f" {EOS} "))
    steps.append(normalizers.Replace("\x1f", " "))  # whitespace to str.split(), not to Rust's char::is_whitespace
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # words joined by single spaces, <eos> written as a line break with no space around it (neurallm's Detokenizer)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(Regex(f"^{EOS}$"), "\n"), decoders.Replace(Regex("^"), " "), decoders.Fuse(),
        decoders.Replace(" \n", "\n"), decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0),
    ])
    return tokenizer
