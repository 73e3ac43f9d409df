"""The sampling settings of a generation, declared once.

``neurallm generate``'s flags, :meth:`neurallm.Run.generate`'s keywords, the page's ``/api/generate`` fields and
the defaults of ``/v1/completions`` all come from :class:`SamplingSettings` (its fields are
:func:`neurallm.settings.setting` fields, as the training settings are). The limits below are the only copies
of the largest token count and seed. Plain Python, no torch: ``neurallm --help`` builds its parser from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neurallm.config import CONTEXT_HELP
from neurallm.errors import ConfigError
from neurallm.settings import setting

# One call makes at most this many tokens: a non-streamed result keeps every token in memory.
MAX_TOKENS = 1_000_000
MAX_SEED = 2**64 - 1  # torch generators take any unsigned 64-bit seed
# A Transformer's generation cache holds `context` positions per layer. More positions than a million (the
# longest generation plus a long prompt) is a typo, and would be a many-gigabyte allocation: refused before.
MAX_CONTEXT = 1_000_000
DEFAULT_TOKENS = 1000  # the PyTorch example's --words 1000
DEFAULT_SEED = 1111  # the PyTorch example's seed
CONTEXT_DEFAULT_TEXT = "bptt + memory; RNNs carry their whole history in their state"


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn (see :mod:`neurallm.generation`)."""

    tokens: int = setting(DEFAULT_TOKENS, aliases=("--words",),
                          help=f"tokens to generate, at most {MAX_TOKENS:,}, printed as they are made (--words: the PyTorch "
                               "example's name)")
    temperature: float = setting(1.0, help="0 = greedy; otherwise divides the logits (higher: more varied)")
    top_k: int | None = setting(None, default_text="all", help="sample among the K most likely tokens")
    top_p: float | None = setting(None, default_text="1",
                                  help="sample among the most likely tokens holding probability P")
    seed: int = setting(DEFAULT_SEED, help="random seed; the same seed gives the same text")
    context: int | None = setting(None, default_text=CONTEXT_DEFAULT_TEXT,
                                  help=CONTEXT_HELP)

    def __post_init__(self) -> None:
        check_sampling(self.tokens, self.temperature, self.top_k, self.top_p, self.seed, self.context)


def check_sampling(tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int,
                   context: int | None, *, min_tokens: int = 1) -> None:
    """Raise a ConfigError naming the flag of the first setting out of range."""
    for name, value in (("tokens", tokens), ("seed", seed), ("top_k", top_k), ("context", context)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
    if tokens < min_tokens:
        raise ConfigError(f"--tokens must be at least {min_tokens}, got {tokens}")
    if tokens > MAX_TOKENS:
        raise ConfigError(f"--tokens must be at most {MAX_TOKENS:,} per call, got {tokens:,}; run again with another --seed for more")
    if not 0 <= temperature < math.inf:  # NaN fails this too
        raise ConfigError(f"--temperature must be 0 (greedy) or a positive finite number, got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and 2**64-1, got {seed}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # NaN fails this too
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if context is not None and context < 1:
        raise ConfigError(f"--context must be at least 1, got {context}")
    if context is not None and context > MAX_CONTEXT:
        raise ConfigError(f"--context must be at most {MAX_CONTEXT:,} positions (a Transformer allocates them), got {context:,}")


def generation_context(settings: SamplingSettings, bptt: int, memory: int) -> int:
    """The context a generation uses: ``settings.context``, or the run's ``bptt + memory`` (what a token saw in
    training); a run whose own default is absurd (a config.json with a huge bptt) is refused here, before any
    allocation, with the flag that overrides it."""
    if settings.context is not None:
        return settings.context
    context = bptt + memory
    if not 1 <= context <= MAX_CONTEXT:
        raise ConfigError(f"the run's bptt + memory ({context:,}) is not a usable generation context (at most {MAX_CONTEXT:,}); "
                          "pass --context N")
    return context
