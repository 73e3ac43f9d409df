"""``neurallm.prepare``: the Python API's preparation, kept apart from :mod:`neurallm.api` so that preparing a
corpus (``neurallm prepare``, ``neurallm.prepare``) never imports torch."""

from __future__ import annotations

import logging
from pathlib import Path

from neurallm.data.settings import DATA_SETTINGS
from neurallm.data.sources import SourceSettings
from neurallm.data.stream import PreparedCorpus, VocabSettings, prepare_corpus
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.trust import log_corpus_warnings
from neurallm.settings import split_settings

logger = logging.getLogger(__name__)


def prepare(data: str | Path, out: str | Path | None = None, **settings) -> PreparedCorpus:
    """Tokenize a corpus and write its id streams (see :func:`neurallm.data.stream.prepare_corpus`).

    Args:
        data: folder, file or registered dataset name.
        out: folder to write (new, empty, or an earlier output of prepare); default a cache folder keyed by the
            data and settings.
        **settings (object): fields of ``SourceSettings`` (format, text_column, text_field, split_ratios, encoding),
            ``TokenizerSettings`` (level, lowercase, strip_punctuation) and ``VocabSettings`` (min_freq, max_vocab);
            ``neurallm prepare --help`` lists them all.
    """
    source, tokenizer, vocab = split_settings(settings, *DATA_SETTINGS, what="prepare")
    source = SourceSettings(data=str(data), **source)
    tokenizer, vocab = TokenizerSettings(**tokenizer), VocabSettings(**vocab)
    prepared = prepare_corpus(source, tokenizer, vocab, out_dir=Path(out) if out else None)
    log_corpus_warnings(prepared.meta, logger)  # splits too small, or mostly <unk>, to trust a result on
    return prepared
