"""neurallm: train, evaluate and sample neural language models on your own text.

The Python API mirrors the CLI::

    import neurallm
    neurallm.train("tinyshakespeare", "runs/shakespeare", level="char", epochs=1, max_time=60)
    run = neurallm.load_run("runs/shakespeare")
    print(run.evaluate(split="test").ppl)
    print(run.generate("ROMEO:", tokens=200, seed=1).text)

Importing the package is cheap: each name below is imported on first use (PEP 562), so ``import neurallm``
and commands that never build a model (``neurallm --help``, ``prepare``, ``explain``) do not pay for torch
(about 2 s and 200 MB).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from neurallm._version import __version__

# public name → the module that defines it
_LAZY = {
    "Run": "neurallm.api", "load_run": "neurallm.api", "prepare": "neurallm.data.prepare", "train": "neurallm.api",
    "ConfigError": "neurallm.errors", "DataError": "neurallm.errors", "NeurallmError": "neurallm.errors",
    "RunDirError": "neurallm.errors", "TrainingError": "neurallm.errors",
    "EvalResult": "neurallm.evaluation", "evaluate": "neurallm.evaluation", "evaluate_naive": "neurallm.evaluation",
    "explain_evaluation": "neurallm.explain", "explain_training": "neurallm.explain",
    "GenerationResult": "neurallm.generation", "generate": "neurallm.generation",
    "stream_generation": "neurallm.generation", "SamplingSettings": "neurallm.sampling",
    "keep_freed_memory": "neurallm.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'neurallm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from neurallm.api import Run, load_run, train
    from neurallm.data.prepare import prepare
    from neurallm.errors import ConfigError, DataError, NeurallmError, RunDirError, TrainingError
    from neurallm.evaluation import EvalResult, evaluate, evaluate_naive
    from neurallm.explain import explain_evaluation, explain_training
    from neurallm.generation import GenerationResult, generate, stream_generation
    from neurallm.runtime import keep_freed_memory
    from neurallm.sampling import SamplingSettings
