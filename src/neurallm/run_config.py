"""A training run's whole configuration: the data settings, the model and the training, as ``config.json`` holds
them.

It sits above the data layer, which declares its own settings (:class:`~neurallm.data.sources.SourceSettings`,
:class:`~neurallm.data.tokenizers.TokenizerSettings`, :class:`~neurallm.data.vocab.VocabSettings`), while
:mod:`neurallm.config` (the model, training, evaluation and serving settings) sits below it: configuration is
imported by data, never the other way round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from neurallm.config import ModelConfig, TrainConfig, from_dict
from neurallm.data.settings import DATA_SETTINGS
from neurallm.data.sources import SourceSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import VocabSettings
from neurallm.errors import ConfigError
from neurallm.settings import settings_of

__all__ = ["DATA_SETTINGS", "TRAIN_SETTINGS", "RunConfig"]

# The settings dataclasses of a training run, in config.json order (those of preparing its corpus first).
TRAIN_SETTINGS = DATA_SETTINGS + (ModelConfig, TrainConfig)


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as the run directory's ``config.json``."""

    source: SourceSettings
    tokenizer: TokenizerSettings
    vocab: VocabSettings
    model: ModelConfig
    train: TrainConfig

    def sections(self) -> tuple:
        """The five settings dataclasses, in ``config.json`` order."""
        return (self.source, self.tokenizer, self.vocab, self.model, self.train)

    def resumed_with(self, given: dict) -> "RunConfig":
        """This configuration with the settings ``given`` to ``--resume`` applied.

        Settings declared ``resumable`` (``--epochs``, ``--max-time``, and ``--device`` and ``--compile``, which
        change where and how the same arithmetic runs) take the new value; any other must equal the saved one,
        since a resumed run continues with its own settings.

        Raises:
            ConfigError: a setting that differs from the run's and may not change (naming its flag), or an
                unknown name.
        """
        sections = self.sections()
        resumable = [s.flag for section in sections for s in settings_of(type(section)) if s.resumable]
        changes: list[dict] = [{} for _ in sections]
        left = dict(given)
        for changed, section in zip(changes, sections):
            for s in settings_of(type(section)):
                if s.name not in left:
                    continue
                value, saved = left.pop(s.name), getattr(section, s.name)
                if s.resumable:
                    changed[s.name] = value
                    continue
                if isinstance(saved, tuple):
                    value = tuple(value)
                if value != saved:
                    raise ConfigError(
                        f"{s.flag} {value} differs from the run's {saved}; --resume continues a run with its own "
                        f"settings (only {', '.join(resumable[:-1])} and {resumable[-1]} may change): drop the flag or start a new --out"
                    )
        if left:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(left))}")
        return RunConfig(*(replace(section, **changed) for section, changed in zip(sections, changes)))

    def to_dict(self) -> dict:
        return {
            "source": self.source.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "vocab": asdict(self.vocab),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "RunConfig":
        try:
            return cls(
                source=from_dict(SourceSettings, data["source"], source),
                tokenizer=from_dict(TokenizerSettings, data["tokenizer"], source),
                vocab=from_dict(VocabSettings, data["vocab"], source),
                model=from_dict(ModelConfig, {"output_bias": True, **data["model"]}, source),  # runs before --output-bias had one
                train=from_dict(TrainConfig, data["train"], source),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: not a complete neurallm run configuration (missing {exc})") from None
