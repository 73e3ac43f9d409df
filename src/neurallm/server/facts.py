"""The facts the page shows about the served model, gathered once at start-up (requests read no files)."""

from __future__ import annotations

import json
import logging

from neurallm.api import Run
from neurallm.config import ServeConfig
from neurallm.models import count_parameters
from neurallm.training import checkpoint as ckpt

logger = logging.getLogger(__name__)


def model_facts(run: Run, settings: ServeConfig) -> dict:
    """Type, size, vocabulary, level, test perplexity or bpc (results.json), training time (metrics.jsonl), limits."""
    model = run.config.model
    level = run.config.tokenizer.level
    test = _read_json(run.folder / ckpt.RESULTS_FILE, default={}).get("test") or {}
    metrics = _read_metrics(run.folder / ckpt.METRICS_FILE)
    test_metric = None
    if test:
        name = "bpc" if level == "char" else "ppl"
        value = test.get(name, test.get("ppl"))
        test_metric = {"name": name, "value": value, "split": "test"} if value is not None else None
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
        "epochs": max((int(r.get("epoch", 0)) for r in metrics if r.get("complete", True)), default=0),
        "training_seconds": round(sum(float(r.get("seconds", 0.0)) for r in metrics), 1),
        "limits": {"max_tokens": settings.max_tokens, "max_prompt_chars": settings.max_prompt_chars,
                   "max_queue": settings.max_queue, "timeout": settings.timeout},
    }


def _read_json(path, default):
    # The facts are decoration: a run whose results.json is missing (training stopped early) or damaged is
    # still served, with the fact left blank.
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s cannot be read (%s); its facts are left out of the page", path, exc)
        return default


def _read_metrics(path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [r for r in (json.loads(line) for line in lines if line.strip()) if isinstance(r, dict)]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s cannot be read (%s); the training time is left out of the page", path, exc)
        return []
