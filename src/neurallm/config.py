"""Settings of a model, of a training run and of the commands that use a run, as dataclasses checked in
``__post_init__``.

A run directory's ``config.json`` holds the model and training settings (plus the data settings:
:class:`neurallm.run_config.RunConfig`), so a run can be rebuilt, resumed and evaluated without the command line
that made it. This module imports nothing of the package but :mod:`neurallm.settings` and :mod:`neurallm.errors`:
configuration sits below the data layer (whose own settings live beside their code).

One source of truth
-------------------
Every setting is one dataclass field declared with :func:`neurallm.settings.setting`: its default, its help
text, and how users spell it. The CLI flags (``neurallm train/prepare/eval``), the keyword arguments of
``neurallm.train()`` / ``neurallm.prepare()``, the README's flag tables and ``--resume``'s checks are all
generated from these fields. To add a setting:

1. add a field here (model or training) or to the data settings (``data/sources.py``, ``data/tokenizers.py``,
   ``data/stream.py``)::

       weight_drop: float = setting(0.0, help="DropConnect on the hidden-to-hidden weights", flag="--wdrop")

   ``help`` is required; ``flag`` only when the flag is not ``--`` + the name with dashes; ``choices``,
   ``aliases`` (other spellings, e.g. the PyTorch example's ``--batch_size``), ``parse`` (text → value when
   the type cannot do it), ``default_text`` (when the default needs words), ``resumable=True`` if
   ``--resume`` may change it (like ``epochs``);
2. check its range in the class's ``__post_init__`` with a message naming the flag and the fix;
3. use it where it acts, and regenerate the README's flag tables: ``python scripts/flags_table.py --write``
   (``tests/test_cli.py`` fails while they differ from the parser).

Nothing else: no flag list, keyword list or resume list to keep in step. Runs saved before a setting existed
still load (a missing key takes the default). This module and :mod:`neurallm.settings` never import torch,
so ``neurallm --help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

from neurallm.errors import ConfigError
from neurallm.settings import setting

MODEL_TYPES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU", "AWD_LSTM", "Transformer")
AWD_ONLY = ("dropouti", "dropouth", "dropoute", "wdrop", "alpha", "beta")  # settings only AWD_LSTM reads
# Each optimizer, with the copies of the weights its state holds (AdamW: two moments; NT-ASGD: the running
# average), which the memory check counts (neurallm.training.footprint).
OPTIMIZER_STATE_COPIES = {"sgd": 0, "adamw": 2, "ntasgd": 1}
OPTIMIZERS = tuple(OPTIMIZER_STATE_COPIES)
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("none", "bf16", "auto")
# Upper bounds far beyond any model this package trains, so that a crafted config.json (nlayers 10**6) or a typo
# (--nhid 2000000) is one line rather than minutes of building and gigabytes of memory.
MAX_WIDTH = 65_536
MAX_LAYERS = 1_024
MAX_VOCAB = 1 << 26
MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds
# Exact evaluation's default columns: the fastest batch size on the PyTorch example's LSTM (benchmarks/eval_speed.py;
# every batch size agrees to well under 0.05%, so only speed decides). Columns cost a burn-in each; wider batches
# make the RNN's per-step matrix products efficient.
EVAL_BATCH_SIZE = 40
# Exact evaluation's default precision (neurallm eval --amp): float32, so that `eval` without flags gives the figure
# validation and `train`'s test line give (a tiny BPE run's bfloat16 figure was 0.04% off it). bfloat16 is one flag
# away: on the PyTorch example's LSTM (one epoch on wt2-lite, test split) +0.011% perplexity against float32, batch
# sizes 10 and 80 within 0.0001% of each other, 2.4x the example's evaluation speed (docs/guides/speed.md).
EVAL_AMP = "none"
# Evaluation-time methods' defaults (README: Cache pointer and dynamic evaluation, with the grids they came from).
# The cache pointer's defaults help untuned (−26% test perplexity on cpu-fast). Dynamic evaluation's learning rate
# by rule and by the run's tokens (bpe runs take the word rate), tuned on valid splits (docs/guides/evaluation.md):
# rms on cpu-fast (word) and char-small (a character's window of 20 covers a fifth of the text a word window does,
# and 2e-4 made char-small worse than no adaptation); sgd's 0.3 lowered validation perplexity by 31-35% on the two
# word runs measured. The best rate depends on the model.
CACHE_THETA = 0.3
CACHE_LAMBDA = 0.1
DYNAMIC_RULES = ("rms", "sgd")
DYNAMIC_LR = {"rms": {"word": 2e-4, "char": 5e-5}, "sgd": {"word": 0.3, "char": 0.3}}
DYNAMIC_DECAY = 0.0
DYNAMIC_WINDOW = 20  # tokens per update: on cpu-fast 20 beat 10, 15 and 30 (and the run's --bptt, 35)


# The splits of a prepared corpus, and the checkpoints of a run (--checkpoint).
SPLITS = ("train", "valid", "test")
CHECKPOINTS = ("best", "last")
# `neurallm explain`'s defaults: a matrix small enough to read in a terminal; the --eval view compares two batch
# sizes against the exact layout, whose burn-in is `context` tokens.
EXPLAIN_BATCH_SIZE = 4
EXPLAIN_BPTT = 2
EXPLAIN_BATCH_SIZES = (8, 6)
EXPLAIN_CONTEXT = 4


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``1,5,10`` → ``(1, 5, 10)`` (``--compare-batch-sizes``)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated batch sizes like 1,5,10,20,80, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {text!r}")
    return values


def parse_cutoffs(text: str) -> tuple[int, ...]:
    """``2000,10000`` → ``(2000, 10000)`` (the ``--cutoffs`` flag)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected increasing word ids like 2000,10000, got {text!r}") from None


def dynamic_lr_default(rule: str, level: str) -> float:
    """--dynamic-lr's default for ``rule`` on a run whose tokens are ``level`` (word, char or bpe)."""
    return DYNAMIC_LR[rule]["char" if level == "char" else "word"]


def _lr_per_rule() -> str:
    """``--help``'s default text of --dynamic-lr, which depends on --dynamic-rule and the run's tokens."""
    def rates(by_level: dict) -> str:
        if len(set(by_level.values())) == 1:
            return f"{by_level['word']:g}"
        return f"{by_level['word']:g} (word, bpe), {by_level['char']:g} (char)"

    return "; ".join(f"{rule}: {rates(by_level)}" for rule, by_level in DYNAMIC_LR.items())


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# `--context` means the same in every subcommand that scores or generates text (train's validation, eval,
# generate, explain): how many tokens of history each scored or generated token gets. Documented here once.
CONTEXT_HELP = "tokens of history each scored or generated token gets"
CONTEXT_AUTO = ("auto: 512 for RNNs; a Transformer with memory max(512, nlayers*(memory+bptt)); "
                "a Transformer without memory bptt/2")


@dataclass
class ModelConfig:
    """Architecture of a language model (each field's ``help`` documents it; the flag is ``--`` + its name)."""

    # No argparse `choices`: __post_init__ names the types in one line, the same for CLI and API callers.
    model: str = setting("LSTM", help="network type: " + ", ".join(MODEL_TYPES))
    vocab_size: int = setting(0, help="number of tokens (set from the vocabulary)", derived=True)
    emsize: int = setting(200, help="embedding size (the Transformer's model width)")
    nhid: int = setting(200, help="hidden units per RNN layer; the Transformer's feed-forward width")
    nlayers: int = setting(2, help="number of layers")
    dropout: float = setting(0.2, help="dropout on embeddings, between layers and before the output layer")
    tied: bool = setting(False, help="share the input embedding and output weights (an RNN with --nhid != --emsize "
                                      "gets a projection to --emsize; AWD_LSTM makes its last layer --emsize wide)")
    nhead: int = setting(2, help="Transformer attention heads; must divide --emsize")
    memory: int = setting(0, help="Transformer-XL memory: positions of the previous window kept per layer and attended to (0: none)")
    # AWD-LSTM's regularisers (Merity et al., 2018); --dropout is its locked dropout on the last layer's output
    dropouti: float = setting(0.0, help="AWD_LSTM: locked dropout on the embeddings (input of the first layer)")
    dropouth: float = setting(0.0, help="AWD_LSTM: locked dropout between LSTM layers")
    dropoute: float = setting(0.0, help="AWD_LSTM: embedding dropout (whole words dropped from the embedding matrix)")
    wdrop: float = setting(0.0, help="AWD_LSTM: DropConnect on the hidden-to-hidden weights")
    alpha: float = setting(0.0, help="AWD_LSTM: activation regularisation, alpha * mean(dropped output^2)")
    beta: float = setting(0.0, help="AWD_LSTM: temporal activation regularisation, beta * mean((h_t - h_{t-1})^2)")
    adaptive_softmax: bool = setting(False, help="adaptive softmax output layer (frequent words full, rare ones in clusters; much faster on large vocabularies)")
    cutoffs: tuple[int, ...] = setting((2000, 10000), help="--adaptive-softmax: word ids where each cluster starts",
                                       parse=parse_cutoffs, default_text="2000,10000")
    # Hugging Face's causal LMs (GPT-NeoX included) have no bias in their output layer: a Transformer trained
    # without one maps onto GPT-NeoX exactly (`neurallm export RUN --hf DIR`). Off for the Transformer because it
    # costs nothing there: test perplexity 178.94 with the bias, 178.87 without (mean of 3 seeds, each within 1% of
    # the other; tiny Transformer on wt2-lite, docs/guides/export.md). RNNs keep it, as the PyTorch example has it.
    output_bias: bool | None = setting(None, help="a bias in the full-softmax output layer (a Transformer without one "
                                       "can be exported to Hugging Face transformers: export --hf)",
                                       default_text="off for --model Transformer, on for the others")

    def __post_init__(self) -> None:
        _require(self.model in MODEL_TYPES, f"--model must be one of {', '.join(MODEL_TYPES)}, got {self.model!r}")
        _require(1 <= self.emsize <= MAX_WIDTH, f"--emsize must be between 1 and {MAX_WIDTH:,}, got {self.emsize}")
        _require(1 <= self.nhid <= MAX_WIDTH, f"--nhid must be between 1 and {MAX_WIDTH:,}, got {self.nhid}")
        _require(1 <= self.nlayers <= MAX_LAYERS, f"--nlayers must be between 1 and {MAX_LAYERS:,}, got {self.nlayers}")
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        _require(1 <= self.nhead <= self.emsize, f"--nhead must be between 1 and --emsize, got {self.nhead}")
        _require(0 <= self.memory <= MAX_WIDTH, f"--memory must be between 0 and {MAX_WIDTH:,}, got {self.memory}")
        _require(0 <= self.vocab_size <= MAX_VOCAB, f"vocab_size must be at most {MAX_VOCAB:,}, got {self.vocab_size}")
        self.cutoffs = tuple(self.cutoffs)
        if self.output_bias is None:  # resolved here so that config.json records what the model was built with
            self.output_bias = self.model != "Transformer"
        for name in ("dropouti", "dropouth", "dropoute", "wdrop"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"--{name} must be in [0, 1), got {value}")
        _require(self.alpha >= 0 and self.beta >= 0, f"--alpha and --beta must be 0 or more, got {self.alpha} and {self.beta}")
        if self.model != "AWD_LSTM":
            used = [f"--{name}" for name in AWD_ONLY if getattr(self, name) != 0.0]
            _require(not used, f"{', '.join(used)} apply to --model AWD_LSTM only; drop them or use --model AWD_LSTM")
        _require(all(isinstance(c, int) and not isinstance(c, bool) for c in self.cutoffs),
                 f"--cutoffs must be whole word ids, like 2000,10000; got {','.join(map(str, self.cutoffs))}")
        _require(all(b > a for a, b in zip(self.cutoffs, self.cutoffs[1:])) and all(c > 0 for c in self.cutoffs),
                 f"--cutoffs must be positive and increasing, like 2000,10000; got {','.join(map(str, self.cutoffs))}")
        _require(not (self.tied and self.adaptive_softmax),
                 "--tied and --adaptive-softmax cannot be combined (the adaptive softmax has no single output matrix "
                 "to share); drop one")
        if self.model == "Transformer":
            _require(self.emsize % self.nhead == 0,
                     f"--emsize {self.emsize} must be divisible by --nhead {self.nhead}")
            _require((self.emsize // self.nhead) % 2 == 0,
                     f"--emsize/--nhead = {self.emsize // self.nhead} must be even for rotary positions; change --emsize or --nhead")
        else:
            _require(self.memory == 0, "--memory applies to --model Transformer only; drop it for RNN models")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """How a model is trained (names and defaults of the PyTorch example where it has them)."""

    lr: float = setting(20.0, help="initial learning rate (use ~1e-3 with adamw)")
    clip: float = setting(0.25, help="gradient norm clipping threshold (0: off)")
    epochs: int = setting(40, help="upper limit of epochs", resumable=True)
    batch_size: int = setting(20, help="columns (parallel streams) in a training batch", aliases=("--batch_size",))
    bptt: int = setting(35, help="tokens per window of truncated back-propagation through time (the mean with --variable-bptt)")
    variable_bptt: bool = setting(False, help="window lengths drawn around --bptt each epoch, learning rate scaled by "
                                               "length/bptt (AWD-LSTM)")
    seed: int = setting(1111, help="random seed")
    optimizer: str = setting("sgd", help="sgd: lr/4 when validation stalls (the PyTorch example); adamw: warm-up + cosine "
                                         "(annealed to --max-time when given); ntasgd: SGD, then averaged weights once "
                                         "validation stalls (AWD-LSTM)", choices=OPTIMIZERS)
    weight_decay: float = setting(0.01, help="weight decay (adamw: decoupled, on matrices; ntasgd: L2 on every parameter)")
    nonmono: int = setting(5, help="ntasgd: start averaging when validation is worse than the best of all but the last NONMONO epochs")
    warmup: int = setting(100, help="AdamW warm-up steps")
    min_lr_ratio: float = setting(0.1, help="adamw: the cosine ends at this fraction of --lr (0: anneals to zero)")
    max_time: float | None = setting(None, help="stop after this many seconds of training, counted across resumes; the best model is kept",
                                     resumable=True)
    device: str = setting("auto", help="where to train", choices=DEVICES, resumable=True)
    shuffle_windows: bool = setting(False, help="fixed windows in random order, state reset per window (the news tutorial)")
    eval_batch_size: int = setting(EVAL_BATCH_SIZE, help="columns used for validation (does not change the result)")
    eval_context: int | None = setting(None, help=CONTEXT_HELP + " (in validation)", flag="--context",
                                       default_text=CONTEXT_AUTO)
    dry_run: bool = setting(False, help="train one batch, then validate and test: checks that everything runs "
                                         "(the PyTorch example's --dry-run)")
    log_interval: int = setting(50, help="batches between progress updates (the progress bar, or a line when stderr is not a terminal)")
    amp: str = setting("auto", help="bf16: train under bfloat16 autocast, matrix products in bfloat16 (GPUs, and CPUs with "
                       "AMX or AVX-512 BF16; refused elsewhere); auto: bf16 where the hardware has it; softmax, loss, "
                       "weights and validation stay float32",
                       choices=AMP_MODES)
    compile: bool = setting(False, help="torch.compile the training step (checkpoints stay loadable without it)", resumable=True)
    tensorboard: bool = setting(False, help="also write the training scalars (loss, ppl, lr, tokens/s, MFU; the metrics.jsonl "
                                             "records) as TensorBoard event files in RUN/tensorboard/ (needs the "
                                             "tensorboard extra)")

    def __post_init__(self) -> None:
        _require(0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}")
        _require(self.clip >= 0, f"--clip must be 0 (off) or positive, got {self.clip}")
        _require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _require(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and 2**64-1, got {self.seed}")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _require(self.bptt >= 1, f"--bptt must be at least 1, got {self.bptt}")
        _require(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _require(0 <= self.weight_decay < math.inf, f"--weight-decay must be 0 or a positive finite number, got {self.weight_decay}")
        _require(not (self.variable_bptt and self.shuffle_windows),
                 "--variable-bptt and --shuffle-windows contradict each other (contiguous windows of varying length vs "
                 "fixed windows in random order); drop one")
        _require(self.nonmono >= 1, f"--nonmono must be at least 1, got {self.nonmono}")
        _require(self.warmup >= 0, f"--warmup must be 0 or more, got {self.warmup}")
        _require(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        _require(self.max_time is None or self.max_time > 0, f"--max-time must be positive seconds, got {self.max_time}")
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _require(self.eval_batch_size >= 1, f"--eval-batch-size must be at least 1, got {self.eval_batch_size}")
        _require(self.eval_context is None or self.eval_context >= 0, f"--context must be 0 or more, got {self.eval_context}")
        _require(self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}")
        _require(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadSettings:
    """Which weights of a run a command loads, and where (``eval``, ``score``, ``generate``, ``serve``, ``export``;
    the keyword arguments of :func:`neurallm.load_run`)."""

    checkpoint: str = setting("best", help="best: model.safetensors (best on validation); last: last.safetensors (an NT-ASGD "
                                           "run that has begun averaging: its running average, which validation scores)",
                              choices=CHECKPOINTS)
    device: str = setting("auto", help="where to run", choices=DEVICES)

    def __post_init__(self) -> None:
        _require(self.checkpoint in CHECKPOINTS, f"--checkpoint must be best or last, got {self.checkpoint!r}")
        _require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")


@dataclass
class EvalConfig:
    """How ``neurallm eval`` scores a split (the keyword arguments of :meth:`neurallm.api.Run.evaluate`)."""

    split: str = setting("test", help="split to score", choices=SPLITS)
    batch_size: int = setting(EVAL_BATCH_SIZE, help="columns evaluated in parallel (does not change the exact result)")
    context: int | None = setting(None, help=CONTEXT_HELP, default_text=CONTEXT_AUTO)
    naive: bool = setting(False, help="the PyTorch example's method (its result depends on --batch-size)")
    amp: str = setting(EVAL_AMP, help="bf16: exact evaluation's matrix products in bfloat16 (within 0.05% of float32; "
                       "refused without bfloat16 hardware); auto: bf16 where the hardware has it; none: float32",
                       choices=AMP_MODES)

    def __post_init__(self) -> None:
        _require(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        _require(self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        _require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _require(self.context is None or self.context >= 0, f"--context must be 0 or more, got {self.context}")


@dataclass
class EvalMethods:
    """Evaluation-time methods of ``neurallm eval`` (README: Cache pointer and dynamic evaluation); keyword
    arguments of :meth:`neurallm.api.Run.evaluate` too."""

    cache_pointer: int | None = setting(None, help="mix in a continuous cache pointer over the last N hidden states",
                                        metavar="N", default_text="off")
    theta: float = setting(CACHE_THETA, help="cache pointer: sharpness of the match")
    lambda_: float = setting(CACHE_LAMBDA, help="cache pointer: weight of the cache in the mixture", flag="--lambda")
    dynamic: bool = setting(False, help="dynamic evaluation: adapt the weights to each window after scoring it (one column)")
    dynamic_rule: str = setting("rms", help="dynamic evaluation: steps scaled by each weight's gradient RMS on the "
                                "training text (rms), or plain SGD steps (sgd)", choices=DYNAMIC_RULES)
    dynamic_lr: float | None = setting(None, help="dynamic evaluation: learning rate (tune it on --split valid)",
                                       default_text=_lr_per_rule())
    dynamic_decay: float = setting(DYNAMIC_DECAY, help="dynamic evaluation: pull back towards the trained weights per window")
    dynamic_window: int = setting(DYNAMIC_WINDOW, help="dynamic evaluation: tokens per update", metavar="TOKENS")

    def __post_init__(self) -> None:
        _require(self.cache_pointer is None or not self.dynamic,
                 "--cache-pointer and --dynamic are separate methods; run them one at a time")


@dataclass
class EvalReport:
    """What ``neurallm eval`` prints (command-line only)."""

    compare_batch_sizes: tuple[int, ...] | None = setting(None, help="print a table of naive vs exact perplexity per batch size",
                                                          parse=parse_batch_sizes, metavar="B1,B2,...")
    json: bool = setting(False, help="print one JSON object")


@dataclass
class ScoreConfig:
    """How ``neurallm score`` reads each line's history (the keyword arguments of :meth:`neurallm.api.Run.score`)."""

    independent: bool = setting(False, help="score each line alone (a cold state) instead of with the lines before it as context")
    context: int | None = setting(None, help=CONTEXT_HELP, default_text="the model's, as eval (RNNs carry their whole history)")

    def __post_init__(self) -> None:
        _require(self.context is None or self.context >= 0, f"--context must be 0 or more, got {self.context}")


@dataclass
class ScoreInput:
    """What ``neurallm score`` reads (exactly one of ``text``, ``file``, ``jsonl``) and prints (command-line only)."""

    text: str | None = setting(None, help="the text to score; its lines are scored one by one")
    file: str | None = setting(None, help="a UTF-8 text file to score, line by line", metavar="F")
    jsonl: str | None = setting(None, help="a JSONL file: one record per line, its text under --text-field", metavar="F")
    text_field: str | None = setting(None, help="JSONL key holding each record's text (required with --jsonl)", metavar="K")
    json: bool = setting(False, help="print one JSON object per input line")


@dataclass
class ExplainConfig:
    """What ``neurallm explain`` draws (its flags; :func:`neurallm.explain.explain_training` and
    :func:`~neurallm.explain.explain_evaluation` take the same defaults)."""

    text: str | None = setting(None, help="a short text to use as the token stream")
    numbers: str | None = setting(None, help="numbers as the token stream, e.g. 1..40", flag="--range", metavar="FIRST..LAST")
    batch_size: int = setting(EXPLAIN_BATCH_SIZE, help="columns of the batchified matrix")
    bptt: int = setting(EXPLAIN_BPTT, help="tokens per BPTT window")
    eval: bool = setting(False, help="the evaluation view: naive layouts against exact, per batch size")
    compare_batch_sizes: tuple[int, ...] = setting(EXPLAIN_BATCH_SIZES, help="batch sizes of the --eval view",
                                                   aliases=("--eval-batch-sizes",), parse=parse_batch_sizes,
                                                   metavar="B1,B2,...")
    context: int = setting(EXPLAIN_CONTEXT, help=CONTEXT_HELP,
                           default_text=f"{EXPLAIN_CONTEXT} (the burn-in of the exact layout in the --eval view)")


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
            # no default to compare with: the annotation says what it holds ("str", "int | None")
            annotation = str(known[name].type)
            if value is None and "None" in annotation:
                continue
            kind = {"str": str, "int": int, "float": (int, float), "bool": bool}.get(annotation.split(" ")[0].split("|")[0])
            if kind is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
                raise ConfigError(f"{source}: {name} is {value!r}, not of type {annotation}; the file is damaged")
            continue
        if isinstance(default, tuple):  # JSON keeps a tuple (--cutoffs, --split-ratios) as a list of numbers
            if not (isinstance(value, (list, tuple))
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"{source}: {name} is {value!r}, not a list of numbers; the file is damaged")
            data = {**data, name: tuple(value)}
            continue
        kinds = (int, float) if type(default) is float else type(default)
        if not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool):
            raise ConfigError(f"{source}: {name} is {value!r}, not of type {type(default).__name__}; the file is damaged")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


@dataclass
class ServeConfig:
    """How ``neurallm serve`` listens and what it accepts (every request is checked against these limits)."""

    host: str = setting("127.0.0.1", help="address to listen on; 127.0.0.1 keeps the server private to this machine")
    port: int = setting(8000, help="TCP port")
    max_tokens: int = setting(1000, help="largest `tokens` a generation request may ask for")
    max_prompt_chars: int = setting(4000, help="longest prompt (and scored text) accepted, in characters")
    max_queue: int = setting(64, help="requests running or waiting for the model; the next one gets 503 with Retry-After")
    timeout: float = setting(60.0, help="seconds a request may wait and run before it gets 504")
    allowed_hosts: tuple[str, ...] | None = setting(
        None, parse=lambda text: tuple(name.strip() for name in text.split(",") if name.strip()), metavar="NAMES",
        default_text="the --host name (and localhost, 127.0.0.1, ::1 on loopback; any on 0.0.0.0)",
        help="comma-separated Host header names answered besides the default (* for any); others get 400")
    api_key: str | None = setting(None, metavar="KEY", default_text="none: any key is accepted",
                                  help="the key OpenAI-compatible clients must send (Authorization: Bearer KEY); "
                                       "a wrong or missing key gets 401")

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"--port must be 1..65535 (0: any free port), got {self.port}")
        _require(self.max_tokens >= 1, f"--max-tokens must be at least 1, got {self.max_tokens}")
        _require(self.max_prompt_chars >= 1, f"--max-prompt-chars must be at least 1, got {self.max_prompt_chars}")
        _require(self.max_queue >= 1, f"--max-queue must be at least 1, got {self.max_queue}")
        _require(self.timeout > 0, f"--timeout must be positive seconds, got {self.timeout}")
        _require(self.api_key is None or self.api_key.strip() != "", "--api-key must not be empty; leave it out to accept any key")
        _require(self.allowed_hosts is None or len(self.allowed_hosts) > 0,
                 "--allowed-hosts needs at least one name (or * for any)")
