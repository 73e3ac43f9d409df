"""neurallm as an lm-evaluation-harness model: ``lm_eval.simple_evaluate(model="neurallm", model_args="run=RUN")``.

Importing this module registers the model ``neurallm`` (``neurallm lm-eval RUN ...`` imports it, then runs the
harness's own command line). Every request goes through neurallm's public functions, so the harness sees the
numbers neurallm reports itself:

* ``loglikelihood_rolling(doc)`` is ``neurallm score``'s log-probability of the document
  (:meth:`neurallm.api.Run.score`): every token scored once, the first after a line break, the state carried
  through the whole document rather than reset at the harness's windows; a text that does not end with a line
  break still has its last line's end-of-line token scored, as ``score`` does;
* ``loglikelihood(context, continuation)`` scores ``context + continuation`` the same way and sums the
  log-probabilities of the tokens after the context's; ``is_greedy`` asks greedy generation from the context
  whether it makes exactly those tokens;
* ``generate_until`` is :meth:`neurallm.api.Run.generate`, cut at the first ``until`` string.

The harness imports datasets, transformers and more, so ``import neurallm`` never imports this module.
"""

from __future__ import annotations

import logging
import sys

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from neurallm.api import Run, load_run
from neurallm.data.tokenizers import detokenize
from neurallm.errors import ConfigError
from neurallm.generation import prompt_to_tokens

logger = logging.getLogger(__name__)

MODEL_NAME = "neurallm"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default for generate_until tasks


@register_model(MODEL_NAME)
class NeurallmLM(LM):
    """A neurallm run directory as an lm-evaluation-harness model.

    Args:
        run: the run directory (``model_args="run=RUN"``).
        checkpoint: ``best`` (model.safetensors) or ``last``.
        device: where to run it (``auto``, ``cpu``, ``cuda``, …; the harness's ``--device``).
        context: tokens of history per scored token for a Transformer without memory (``neurallm score --context``).
        batch_size, max_batch_size: accepted from the harness and ignored: a document is scored in one column,
            so the result cannot depend on them.
    """

    def __init__(self, run: str | None = None, checkpoint: str = "best", device: str | None = None,
                 context: int | None = None, batch_size=None, max_batch_size=None, **unknown) -> None:
        super().__init__()
        if run is None:
            raise ConfigError("the neurallm model needs its run directory: --model_args run=RUN")
        if unknown:
            raise ConfigError(f"unknown model_args for neurallm: {', '.join(sorted(unknown))}; "
                              "known: run, checkpoint, device, context")
        self.run: Run = load_run(run, checkpoint=checkpoint, device=device or "auto")
        self.context = None if context is None else int(context)
        self._device = next(self.run.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return f"neurallm-{self.run.config.tokenizer.level}"

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-probability (nats) of each document, as ``neurallm score`` gives it."""
        results = []
        for request in requests:
            (text,) = request.args
            logprob = self.run.score([text], context=self.context)[0].logprob
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logprob)
            results.append(logprob)
        return results

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Log-probability (nats) of each continuation after its context, and whether greedy decoding makes it."""
        results = []
        for request in requests:
            context, continuation = request.args
            answer = self._continuation_logprob(context, continuation)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), answer)
            results.append(answer)
        return results

    def _continuation_logprob(self, context: str, continuation: str) -> tuple[float, bool]:
        settings, bpe = self.run.config.tokenizer, self.run.vocab.bpe
        context_tokens = prompt_to_tokens(context, settings, bpe)
        whole_tokens = prompt_to_tokens(context + continuation, settings, bpe)
        # the tokens the continuation adds: a continuation that ends the context's last word ("ca" + "t") changes
        # that word's token, so that token counts as the continuation's
        shared = 0
        while shared < min(len(context_tokens), len(whole_tokens)) and context_tokens[shared] == whole_tokens[shared]:
            shared += 1
        if shared == len(whole_tokens):
            return 0.0, True  # nothing to score (an empty continuation)
        # score reads the text as whole lines: its tokens are whole_tokens, plus the last line's end-of-line token
        # when the text does not end with one; log-probabilities of earlier tokens do not depend on later ones
        score = self.run.score([context + continuation], context=self.context)[0]
        logprob = float(sum(score.logprobs[shared:len(whole_tokens)]))
        wanted = whole_tokens[shared:]
        # greedy decoding from the shared tokens (their text: the context itself unless the continuation changed
        # its last token) makes `wanted` exactly when each of its tokens is the most likely after the ones before
        prompt = context if shared == len(context_tokens) else detokenize(whole_tokens[:shared], settings.level, bpe)
        greedy = self.run.generate(prompt=prompt, tokens=len(wanted), temperature=0.0)
        return logprob, greedy.generated_tokens == wanted

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) text after each context, cut at the first ``until`` string."""
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            tokens = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            temperature = temperature if do_sample else 0.0
            top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
            seed = int(gen_kwargs.pop("seed", 1111))
            if gen_kwargs:
                logger.warning(f"neurallm ignores the generation settings {', '.join(sorted(gen_kwargs))}")
            text = ""
            if tokens > 0:
                # the one generation route: stop strings end the text before them, and generation stops there
                result = self.run.generate(prompt=context, tokens=tokens, temperature=temperature,
                                           top_k=None if top_k is None else int(top_k),
                                           top_p=None if top_p is None else float(top_p), seed=seed,
                                           stop=[u for u in until if u])
                # the result's text is the prompt (when it has tokens) followed by the continuation
                text = result.text[len(context):] if result.text.startswith(context) else result.text
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            results.append(text)
        return results


def run_harness_cli(run_dir: str, harness_args: list[str]) -> int:
    """Run the harness's own command line (``lm-eval run``) with ``--model neurallm --model_args run=RUN`` added.

    ``--include-path`` is accepted for the harness's ``--include_path`` (neurallm's flags are spelled with ``-``).
    """
    from lm_eval.__main__ import cli_evaluate

    args = ["--include_path" if arg == "--include-path" else arg for arg in harness_args]
    args = [("--include_path=" + arg.split("=", 1)[1]) if arg.startswith("--include-path=") else arg for arg in args]
    for flag in ("--model", "-M", "--model_args", "-a"):
        if flag in args or any(arg.startswith(flag + "=") for arg in args):
            raise ConfigError(f"neurallm lm-eval sets {flag} itself (the run's model); drop it")
    saved = sys.argv
    sys.argv = ["lm-eval", "run", "--model", MODEL_NAME, "--model_args", f"run={run_dir}", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help and errors
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return 0
