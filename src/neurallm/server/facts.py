"""The facts the page shows about the served model, gathered once at start-up (requests read no files)."""

from __future__ import annotations

import logging
import math

from neurallm.api import Run
from neurallm.config import ServeConfig
from neurallm.errors import RunDirError
from neurallm.models import count_parameters
from neurallm.runfolder import read_metrics, read_results

logger = logging.getLogger(__name__)


def model_facts(run: Run, settings: ServeConfig) -> dict:
    """Type, size, vocabulary, level, test perplexity or bpc (results.json), training time (metrics.jsonl), limits.

    The test result and the training time are decoration: a run whose results.json or metrics.jsonl is missing
    (training stopped early) or damaged is still served, with the fact left out (the page says "no test result")
    and a warning in the log naming the file.
    """
    model = run.config.model
    level = run.config.tokenizer.level
    try:
        test = (read_results(run.folder) or {}).get("test") or {}
    except RunDirError as exc:
        logger.warning("warning: %s; the test result is left out of the page", exc)
        test = {}
    try:
        metrics = read_metrics(run.folder)
    except RunDirError as exc:
        logger.warning("warning: %s; the training time is left out of the page", exc)
        metrics = []
    test_metric = None
    name = "bpc" if level == "char" else "ppl"
    value = test.get(name, test.get("ppl"))
    if value is not None and math.isfinite(value):  # an infinite perplexity is no fact JSON can carry
        test_metric = {"name": name, "value": value, "split": "test"}
    return {
        "run": run.folder.resolve().name,
        "model": model.model,
        "parameters": count_parameters(run.model),
        "layers": model.nlayers,
        "emsize": model.emsize,
        "nhid": model.nhid,
        "vocabulary": len(run.vocab),
        "level": level,
        "test": test_metric,
        # whole epochs: a stop in mid-epoch (--max-time, Ctrl-C) records its part of an epoch, which is not one
        "epochs": max((r["epoch"] for r in metrics if r.get("complete", True)), default=0),
        "training_seconds": round(sum(r.get("seconds") or 0.0 for r in metrics), 1),
        "limits": {"max_tokens": settings.max_tokens, "max_prompt_chars": settings.max_prompt_chars,
                   "max_queue": settings.max_queue, "timeout": settings.timeout},
    }
