"""neurallm: train, evaluate and sample neural language models on your own text.

The Python API mirrors the CLI::

    import neurallm
    neurallm.train("tinyshakespeare", "runs/shakespeare", level="char", epochs=1, max_time=60)
    run = neurallm.load_run("runs/shakespeare")
    print(run.evaluate(split="test").ppl)
    print(run.generate("ROMEO:", tokens=200, seed=1).text)
"""

__version__ = "0.1.0"

from neurallm.api import Run, load_run, prepare, train  # noqa: E402
from neurallm.errors import ConfigError, DataError, NeurallmError, RunDirError, TrainingError  # noqa: E402
from neurallm.evaluation import EvalResult, evaluate, evaluate_naive  # noqa: E402
from neurallm.explain import explain_evaluation, explain_training  # noqa: E402
from neurallm.generation import GenerationResult, generate  # noqa: E402

__all__ = [
    "__version__", "Run", "load_run", "prepare", "train", "evaluate", "evaluate_naive", "generate",
    "explain_training", "explain_evaluation", "EvalResult", "GenerationResult",
    "NeurallmError", "ConfigError", "DataError", "RunDirError", "TrainingError",
]
