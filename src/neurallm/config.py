"""Settings of a model and of a training run, as dataclasses checked in ``__post_init__``.

A run directory's ``config.json`` holds these (plus the data settings), so a run can be rebuilt, resumed
and evaluated without the command line that made it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

from neurallm.data.sources import SourceSettings
from neurallm.data.stream import VocabSettings
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.errors import ConfigError

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU", "Transformer")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda", "mps")
# Upper bounds far beyond any model this package trains, so that a crafted config.json (nlayers 10**6) or a typo
# (--nhid 2000000) is one line rather than minutes of building and gigabytes of memory.
MAX_WIDTH = 65_536
MAX_LAYERS = 1_024
MAX_VOCAB = 1 << 26
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Architecture of a language model.

    Attributes:
        model: one of ``RNN_TANH RNN_RELU LSTM GRU Transformer``.
        vocab_size: number of tokens (set from the vocabulary).
        emsize: embedding size (the Transformer's model width).
        nhid: hidden units per RNN layer; the Transformer's feed-forward width.
        nlayers: number of layers.
        dropout: dropout probability on embeddings, between layers and before the output layer.
        tied: share the input embedding and output weights (RNNs need ``emsize == nhid``).
        nhead: attention heads (Transformer); must divide ``emsize``.
        memory: Transformer-XL memory: positions of the previous window kept per layer and attended to (0: none).
    """

    model: str = "LSTM"
    vocab_size: int = 0
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 2
    dropout: float = 0.2
    tied: bool = False
    nhead: int = 2
    memory: int = 0

    def __post_init__(self) -> None:
        _require(self.model in MODEL_TYPES, f"--model must be one of {', '.join(MODEL_TYPES)}, got {self.model!r}")
        _require(1 <= self.emsize <= MAX_WIDTH, f"--emsize must be between 1 and {MAX_WIDTH:,}, got {self.emsize}")
        _require(1 <= self.nhid <= MAX_WIDTH, f"--nhid must be between 1 and {MAX_WIDTH:,}, got {self.nhid}")
        _require(1 <= self.nlayers <= MAX_LAYERS, f"--nlayers must be between 1 and {MAX_LAYERS:,}, got {self.nlayers}")
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        _require(1 <= self.nhead <= self.emsize, f"--nhead must be between 1 and --emsize, got {self.nhead}")
        _require(0 <= self.memory <= MAX_WIDTH, f"--memory must be between 0 and {MAX_WIDTH:,}, got {self.memory}")
        _require(0 <= self.vocab_size <= MAX_VOCAB, f"vocab_size must be at most {MAX_VOCAB:,}, got {self.vocab_size}")
        if self.model == "Transformer":
            _require(self.emsize % self.nhead == 0,
                     f"--emsize {self.emsize} must be divisible by --nhead {self.nhead}")
            _require((self.emsize // self.nhead) % 2 == 0,
                     f"--emsize/--nhead = {self.emsize // self.nhead} must be even for rotary positions; change --emsize or --nhead")
        else:
            _require(self.memory == 0, "--memory applies to --model Transformer only; drop it for RNN models")
            # The PyTorch example makes the same choice: tying an RNN needs the hidden size to equal the embedding size.
            _require(not self.tied or self.emsize == self.nhid,
                     f"--tied needs --emsize equal to --nhid for RNN models (got {self.emsize} and {self.nhid}); "
                     "set them equal or drop --tied")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """How a model is trained (names and defaults of the PyTorch example where it has them).

    Attributes:
        lr: initial learning rate.
        clip: gradient norm clipping threshold (0 disables).
        epochs: upper limit of epochs.
        batch_size: columns (parallel streams) in a training batch.
        bptt: tokens per window of truncated back-propagation through time.
        seed: random seed.
        optimizer: ``sgd`` (lr ÷4 when validation stalls, as the PyTorch example) or ``adamw`` (warm-up + cosine).
        weight_decay: AdamW weight decay.
        warmup: AdamW warm-up steps.
        max_time: stop after this many seconds of training (None: no limit); the best model is kept.
        device: ``auto cpu cuda mps``.
        shuffle_windows: fixed windows in random order, state reset per window (the news tutorial).
        eval_batch_size: columns used for validation (does not change the result; see evaluation).
        eval_context: tokens of history every scored validation token gets (None: the evaluation default).
        log_interval: batches between progress-bar refreshes of the loss shown.
    """

    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 40
    batch_size: int = 20
    bptt: int = 35
    seed: int = 1111
    optimizer: str = "sgd"
    weight_decay: float = 0.01
    warmup: int = 100
    max_time: float | None = None
    device: str = "auto"
    shuffle_windows: bool = False
    eval_batch_size: int = 10
    eval_context: int | None = None
    log_interval: int = 50

    def __post_init__(self) -> None:
        _require(0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}")
        _require(self.clip >= 0, f"--clip must be 0 (off) or positive, got {self.clip}")
        _require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _require(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and 2**64-1, got {self.seed}")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _require(self.bptt >= 1, f"--bptt must be at least 1, got {self.bptt}")
        _require(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(0 <= self.weight_decay < math.inf, f"--weight-decay must be 0 or a positive finite number, got {self.weight_decay}")
        _require(self.warmup >= 0, f"--warmup must be 0 or more, got {self.warmup}")
        _require(self.max_time is None or self.max_time > 0, f"--max-time must be positive seconds, got {self.max_time}")
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _require(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        _require(self.eval_context is None or self.eval_context >= 0, f"--context must be 0 or more, got {self.eval_context}")
        _require(self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}")

    def to_dict(self) -> dict:
        return asdict(self)


def from_dict(cls, data: dict, source: str):
    """Build ``cls`` from a saved dict, naming ``source`` if a key is unknown or a value invalid.

    A value must have its default's JSON type (an int for an int setting, a number for a float one), so a
    damaged or hand-edited file fails here with one line rather than deep inside the model.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {cls.__name__} settings are not a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}; was it written by a newer neurallm?")
    for name, value in data.items():
        default = known[name].default
        if default is MISSING or default is None:
            continue
        kinds = (int, float) if type(default) is float else type(default)
        if not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool):
            raise ConfigError(f"{source}: {name} is {value!r}, not of type {type(default).__name__}; the file is damaged")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


@dataclass
class RunConfig:
    """Everything that defines a training run; saved as the run directory's ``config.json``."""

    source: SourceSettings
    tokenizer: TokenizerSettings
    vocab: VocabSettings
    model: ModelConfig
    train: TrainConfig

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
            source_settings = dict(data["source"])
            source_settings["split_ratios"] = tuple(source_settings.get("split_ratios", (0.9, 0.05, 0.05)))
            return cls(
                source=from_dict(SourceSettings, source_settings, source),
                tokenizer=from_dict(TokenizerSettings, data["tokenizer"], source),
                vocab=from_dict(VocabSettings, data["vocab"], source),
                model=from_dict(ModelConfig, data["model"], source),
                train=from_dict(TrainConfig, data["train"], source),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source}: not a complete neurallm run configuration (missing {exc})") from None
