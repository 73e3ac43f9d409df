"""``neurallm.prepare``: the Python API's preparation, kept apart from :mod:`neurallm.api` so that preparing a
corpus (``neurallm prepare``, ``neurallm.prepare``) never imports torch."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from neurallm.data.sources import SourceSettings
from neurallm.data.stream import PreparedCorpus, VocabSettings, prepare_corpus
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.errors import ConfigError


def split_kwargs(cls, kwargs: dict) -> dict:
    """Pop the entries of ``kwargs`` that are fields of the dataclass ``cls``."""
    names = {f.name for f in fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def prepare(data: str | Path, out: str | Path | None = None, **settings) -> PreparedCorpus:
    """Tokenize a corpus and write its id streams (see :func:`neurallm.data.stream.prepare_corpus`).

    Args:
        data: folder, file or registered dataset name.
        out: folder to write; default a cache folder keyed by the data and settings.
        **settings: fields of ``SourceSettings`` (format, text_column, text_field, split_ratios, encoding),
            ``TokenizerSettings`` (level, lowercase, strip_punctuation) and ``VocabSettings`` (min_freq, max_vocab).
    """
    settings = dict(settings)
    source = SourceSettings(data=str(data), **split_kwargs(SourceSettings, settings))
    tokenizer = TokenizerSettings(**split_kwargs(TokenizerSettings, settings))
    vocab = VocabSettings(**split_kwargs(VocabSettings, settings))
    if settings:
        raise ConfigError(f"unknown setting(s) for prepare: {', '.join(sorted(settings))}")
    return prepare_corpus(source, tokenizer, vocab, out_dir=Path(out) if out else None)
