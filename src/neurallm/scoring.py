"""Log-probability of given texts under a model, token by token and line by line.

The rules are exact evaluation's (:mod:`neurallm.evaluation`) applied to one text at a time:

* a text is read as one document: its lines are tokenized the training way (``<eos>`` ends every line at
  word level, ``"\\n"`` at character level) and each line is scored *with the lines before it as context*,
  the state carried across line breaks as in training. ``independent=True`` scores every line alone instead
  (a cold state per line), for lists of unrelated sentences;
* the first token of a document is predicted after a line break, as at the start of any line of the training
  text, so every token of the text is scored (the line-break token it is conditioned on is not);
* a model that carries no state (the Transformer without memory) gets sliding windows, each scored token
  seeing ``context`` tokens of history (default ``bptt // 2``, as evaluation);
* tokens outside the vocabulary are scored as ``<unk>`` and counted, because a text whose words are half
  ``<unk>`` scores deceptively well.

Log-probabilities are natural logarithms (nats); ``loss`` is the mean negative log-probability per token and
``ppl = exp(loss)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.data.batching import EvalColumn, plan_sliding_windows
from neurallm.data.tokenizers import TokenizerSettings, line_break_token, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.evaluation import default_context
from neurallm.models.contract import LanguageModel


@dataclass
class LineScore:
    """One line of a text, scored.

    Attributes:
        text: the line as given (without its line break).
        tokens: its tokens as the model read them (end-of-line token included).
        logprobs: natural-log probability of each token, same length as ``tokens``.
        unknown: how many of ``tokens`` are not in the vocabulary (scored as ``<unk>``).
    """

    text: str
    tokens: list[str]
    logprobs: list[float]
    unknown: int

    @property
    def logprob(self) -> float:
        """Sum of the tokens' log-probabilities (nats)."""
        return float(sum(self.logprobs))

    @property
    def loss(self) -> float:
        """Mean negative log-probability per token (nats)."""
        return -self.logprob / max(1, len(self.tokens))

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def to_dict(self) -> dict:
        return {"text": self.text, "logprob": self.logprob, "tokens": len(self.tokens), "loss": self.loss,
                "ppl": self.ppl, "unknown": self.unknown}


@dataclass
class TextScore:
    """A whole text, scored line by line (see :class:`LineScore`)."""

    lines: list[LineScore]

    @property
    def tokens(self) -> list[str]:
        return [token for line in self.lines for token in line.tokens]

    @property
    def logprobs(self) -> list[float]:
        return [value for line in self.lines for value in line.logprobs]

    @property
    def logprob(self) -> float:
        return float(sum(line.logprob for line in self.lines))

    @property
    def total_loss(self) -> float:
        """Negative log-probability of the whole text (nats)."""
        return -self.logprob

    @property
    def loss(self) -> float:
        return self.total_loss / max(1, len(self.tokens))

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def unknown(self) -> int:
        return sum(line.unknown for line in self.lines)


@torch.no_grad()
def score_texts(
    model: LanguageModel,
    vocab: Vocab,
    tokenizer: TokenizerSettings,
    texts: list[str],
    *,
    independent: bool = False,
    bptt: int,
    context: int | None = None,
) -> list[TextScore]:
    """Score each text of ``texts`` (see the module docstring for the rules).

    Args:
        model: a neurallm language model (put in eval mode here).
        vocab: its vocabulary.
        tokenizer: the run's tokenizer settings.
        texts: documents; each is scored separately, from a cold state.
        independent: score every line of a text alone instead of carrying context across its lines.
        bptt: the window length the model was trained with.
        context: tokens of history per scored token for a model without state (default ``bptt // 2``).

    Returns:
        One :class:`TextScore` per text, with one :class:`LineScore` per line.
    """
    if context is not None and context < 0:
        raise ConfigError(f"--context must be 0 or more, got {context}")
    context = default_context(model, bptt) if context is None else context
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode is given back below
    try:
        return [_score_text(model, vocab, tokenizer, text, independent, bptt, context) for text in texts]
    finally:
        model.train(was_training)


def _score_text(model: LanguageModel, vocab: Vocab, tokenizer: TokenizerSettings, text: str, independent: bool, bptt: int,
                context: int) -> TextScore:
    lines = text.splitlines() or [""]
    tokenized = [tokenize_line(line, tokenizer, vocab.bpe) for line in lines]
    groups = [[i] for i in range(len(lines))] if independent else [list(range(len(lines)))]
    logprobs: list[list[float]] = [[] for _ in lines]
    for group in groups:
        document = [line_break_token(tokenizer, vocab.bpe)] + [t for i in group for t in tokenized[i]]
        ids, _ = vocab.encode(document)
        values = _target_logprobs(model, np.asarray(ids, dtype=np.int64), bptt, context)
        offset = 0
        for i in group:
            logprobs[i] = values[offset : offset + len(tokenized[i])].tolist()
            offset += len(tokenized[i])
    return TextScore([LineScore(line, tokens, values, vocab.encode(tokens)[1])
                      for line, tokens, values in zip(lines, tokenized, logprobs)])


def _target_logprobs(model: LanguageModel, ids: np.ndarray, bptt: int, context: int) -> np.ndarray:
    """Log-probability of ``ids[1:]``, each given the tokens before it (exact evaluation with batch size 1)."""
    layout = model.eval_layout(bptt)
    if layout.carries_state:
        # one column over the whole document, read window after window with the state carried
        return _run_column(model, ids, EvalColumn(0, 1, len(ids)), layout.window)
    columns = plan_sliding_windows(len(ids), max(1, layout.window - context), context)
    return np.concatenate([_run_column(model, ids, column, column.length) for column in columns])


def _run_column(model: LanguageModel, ids: np.ndarray, column: EvalColumn, window: int) -> np.ndarray:
    """Run one column from a cold state in windows; log-probabilities of its scored targets."""
    device = next(model.parameters()).device
    inputs = torch.from_numpy(ids[column.start : column.score_stop - 1]).to(device).view(-1, 1)  # (T, 1)
    targets = torch.from_numpy(ids[column.start + 1 : column.score_stop]).to(device)  # (T,)
    state = model.init_state(1, device)
    pieces = []
    for row in range(0, inputs.size(0), window):
        features, state = model.features(inputs[row : row + window], state)  # (t, 1, D)
        log_probs = model.head.log_probs(features[:, 0])  # (t, V)
        pieces.append(log_probs.gather(1, targets[row : row + window, None])[:, 0])
    values = torch.cat(pieces).double().cpu().numpy()
    return values[column.score_start - 1 - column.start :]  # burn-in targets are not scored


@dataclass
class IdScores:
    """Log-probabilities of a token-id sequence (see :func:`score_ids`).

    Attributes:
        logprobs: natural-log probability of ``ids[1:]``, each given the ids before it.
        top: per scored position, the ``top`` most likely (id, log-probability) pairs, most likely first.
    """

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@torch.no_grad()
def score_ids(model: LanguageModel, ids: list[int], *, bptt: int, context: int | None = None, top: int = 0) -> IdScores:
    """Score ``ids[1:]`` by :func:`score_texts`' rules (one document, state carried; sliding windows of ``context``
    for a model without state), optionally with the ``top`` most likely alternatives at each position.

    ``ids[0]`` is the token the document is read after (:func:`score_texts` puts the line-break token there), so
    for the same tokens the log-probabilities are :func:`score_texts`' own. This is the scorer of the server's
    ``echo`` and of clients that hold token ids rather than text.
    """
    if context is not None and context < 0:
        raise ConfigError(f"--context must be 0 or more, got {context}")
    if len(ids) < 2:
        return IdScores([], [])
    context = default_context(model, bptt) if context is None else context
    array = np.asarray(ids, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        layout = model.eval_layout(bptt)
        if layout.carries_state:
            parts = [_score_column(model, array, EvalColumn(0, 1, len(ids)), layout.window, top)]
        else:
            columns = plan_sliding_windows(len(ids), max(1, layout.window - context), context)
            parts = [_score_column(model, array, column, column.length, top) for column in columns]
    finally:
        model.train(was_training)
    return IdScores([v for values, _ in parts for v in values], [t for _, tops in parts for t in tops])


def _score_column(model: LanguageModel, ids: np.ndarray, column: EvalColumn, window: int,
                  top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """One column from a cold state in windows: its scored targets' log-probabilities and top alternatives."""
    device = next(model.parameters()).device
    inputs = torch.from_numpy(ids[column.start : column.score_stop - 1]).to(device).view(-1, 1)  # (T, 1)
    targets = torch.from_numpy(ids[column.start + 1 : column.score_stop]).to(device)  # (T,)
    state = model.init_state(1, device)
    values, tops = [], []
    for row in range(0, inputs.size(0), window):
        features, state = model.features(inputs[row : row + window], state)  # (t, 1, D)
        log_probs = model.head.log_probs(features[:, 0])  # (t, V)
        values.append(log_probs.gather(1, targets[row : row + window, None])[:, 0].double().cpu())
        if top:
            best, best_ids = torch.topk(log_probs, min(top, log_probs.size(1)), dim=1)
            tops.extend(list(zip(i, v)) for i, v in zip(best_ids.tolist(), best.double().tolist()))
    skip = column.burn_in  # burn-in targets are not scored
    return torch.cat(values).tolist()[skip:], tops[skip:]
