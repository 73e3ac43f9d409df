"""The data layer's settings, in ``config.json`` order: how the text is read (``SourceSettings``), cut into
tokens (``TokenizerSettings``) and mapped to ids (``VocabSettings``). Each is declared beside the code it steers;
this module only lists them, without importing numpy (``neurallm --help`` builds its flags from them)."""

from __future__ import annotations

from neurallm.data.sources import SourceSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import VocabSettings

DATA_SETTINGS = (SourceSettings, TokenizerSettings, VocabSettings)
