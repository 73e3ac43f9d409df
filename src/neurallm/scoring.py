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
* tokens scored as ``<unk>`` are counted (words outside the vocabulary, and ``<unk>`` written in the text),
  because a text whose words are half ``<unk>`` scores deceptively well;
* text that is not valid Unicode (bytes that were not UTF-8, passed through ``argv`` as lone surrogates) is read
  with each bad byte as U+FFFD, counted in ``LineScore.replaced``.

One algorithm: the windows are run by :func:`neurallm.evaluation.run_columns_from`, the column runner of exact
evaluation, with a scorer that keeps each target's log-probability. A document is read in pieces of whole windows
(state carried from piece to piece, or whole sliding windows for a model without state), so scoring a file of
any length holds one piece at a time: :func:`score_lines` yields each line's score as soon as it is complete.

Log-probabilities are natural logarithms (nats); ``loss`` is the mean negative log-probability per token and
``ppl = exp(loss)``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from neurallm.data.batching import EvalColumn, plan_sliding_windows, sliding_window
from neurallm.data.tokenizers import TokenizerSettings, line_break_token, replace_undecodable, tokenize_line
from neurallm.data.vocab import Vocab
from neurallm.errors import ConfigError
from neurallm.evaluation import HEAD_CHUNK, default_context, run_columns_from
from neurallm.models.contract import LanguageModel


@dataclass
class LineScore:
    """One line of a text, scored.

    Attributes:
        text: the line as given (without its line break).
        tokens: its tokens as the model read them (end-of-line token included).
        logprobs: natural-log probability of each token, same length as ``tokens``.
        unknown: how many of ``tokens`` are scored as ``<unk>`` (not in the vocabulary, or ``<unk>`` in the text).
        replaced: characters of the given text that were not valid Unicode and were read as U+FFFD.
    """

    text: str
    tokens: list[str]
    logprobs: list[float]
    unknown: int
    replaced: int = 0

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


# Targets scored per piece of a document: whole windows of a model that carries state (so the pieces are run
# exactly as one long column), whole sliding windows side by side for one that does not.
_PIECE_TARGETS = 8192
_SLIDING_WINDOWS_PER_PIECE = 8


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
    return [TextScore(list(score_lines(model, vocab, tokenizer, text.splitlines() or [""], independent=independent,
                                       bptt=bptt, context=context)))
            for text in texts]


def score_lines(
    model: LanguageModel,
    vocab: Vocab,
    tokenizer: TokenizerSettings,
    lines: Iterable[str],
    *,
    independent: bool = False,
    bptt: int,
    context: int | None = None,
) -> Iterator[LineScore]:
    """Score the lines of one document as they come (a file read line by line), yielding each line's score as soon
    as its last token is scored; memory holds one piece of the document, whatever its length.

    Arguments as :func:`score_texts` (``lines``: the document's lines, without line breaks).
    """
    if context is not None and context < 0:
        raise ConfigError(f"--context must be 0 or more, got {context}")
    context = default_context(model, bptt) if context is None else context
    was_training = model.training
    model.eval()  # no dropout while scoring; the caller's mode is given back below
    try:
        with torch.no_grad():
            document = None
            for line in lines:
                if document is None or independent:
                    if document is not None:
                        yield from document.finish()
                    document = _Document(model, vocab, tokenizer, bptt, context)
                yield from document.add(line)
            if document is not None:
                yield from document.finish()
    finally:
        model.train(was_training)


class _Document:
    """One document scored piece by piece: ids wait in ``buffer`` (global positions ``base`` on) until a piece of
    whole windows can be run; each line's score is given out once all its tokens are scored."""

    def __init__(self, model: LanguageModel, vocab: Vocab, tokenizer: TokenizerSettings, bptt: int, context: int) -> None:
        self.model, self.vocab, self.tokenizer, self.context = model, vocab, tokenizer, context
        self.layout = model.eval_layout(bptt)
        self.stride = max(1, self.layout.window - context)
        # the first token is predicted after a line break, as at the start of any line of the training text
        first, _ = vocab.encode([line_break_token(tokenizer, vocab.bpe)])
        self.buffer = np.asarray(first, dtype=np.int64)
        self.base = 0  # global position of buffer[0]
        self.next_target = 1  # global position of the first target not scored yet
        self.state = None  # carried from piece to piece (a model that carries state)
        self.lines: deque[tuple[str, list[str], int, int]] = deque()  # waiting: text, tokens, unknown, replaced
        self.values: list[np.ndarray] = []  # scored log-probabilities not yet given to a line
        self.n_values = 0

    @property
    def _end(self) -> int:
        return self.base + len(self.buffer)

    def add(self, line: str) -> Iterator[LineScore]:
        line, replaced = replace_undecodable(line)
        tokens = tokenize_line(line, self.tokenizer, self.vocab.bpe)
        ids, _ = self.vocab.encode(tokens)
        unknown = sum(1 for i in ids if i == self.vocab.unk_id)
        self.lines.append((line, tokens, unknown, replaced))
        self.buffer = np.concatenate((self.buffer, np.asarray(ids, dtype=np.int64)))
        while self._end - self.next_target >= self._piece():
            self._run(self._piece())
        yield from self._complete_lines()

    def finish(self) -> Iterator[LineScore]:
        while self._end - self.next_target > 0:
            self._run(min(self._piece(), self._end - self.next_target))
        yield from self._complete_lines()

    def _piece(self) -> int:
        if self.layout.carries_state:
            window = self.layout.window
            return window * max(1, _PIECE_TARGETS // window)
        return self.stride * _SLIDING_WINDOWS_PER_PIECE

    def _run(self, n_targets: int) -> None:
        """Score the next ``n_targets`` targets and drop the ids no later piece needs."""
        first = self.next_target - self.base  # local position of the first target
        if self.layout.carries_state:
            columns, window = [EvalColumn(first - 1, first, first + n_targets)], self.layout.window
        else:
            # the windows exact evaluation cuts from the whole document, in buffer positions (the buffer holds
            # `context` tokens before the first target)
            ends = self.base + min(len(self.buffer), first + n_targets)
            columns = [sliding_window(t, ends, self.stride, self.context)
                       for t in range(self.next_target, self.next_target + n_targets, self.stride)]
            columns = [EvalColumn(c.start - self.base, c.score_start - self.base, c.score_stop - self.base) for c in columns]
            window = max(c.length for c in columns)
        collected = _Collector(self.model, len(columns))
        _, _, state = run_columns_from(self.model, self.buffer, columns, window, collected, self.state)
        if self.layout.carries_state:
            self.state = state
        for values in collected.columns:
            self.values.append(np.concatenate(values) if values else np.zeros(0))
            self.n_values += len(self.values[-1])
        self.next_target += n_targets
        keep_from = self.next_target - 1 - (0 if self.layout.carries_state else self.context)
        drop = max(0, keep_from - self.base)
        self.buffer, self.base = self.buffer[drop:], self.base + drop

    def _complete_lines(self) -> Iterator[LineScore]:
        while self.lines and len(self.lines[0][1]) <= self.n_values:
            text, tokens, unknown, replaced = self.lines.popleft()
            values = np.concatenate(self.values) if len(self.values) != 1 else self.values[0]
            mine, rest = values[: len(tokens)], values[len(tokens) :]
            self.values, self.n_values = [rest], len(rest)
            yield LineScore(text, tokens, mine.tolist(), unknown, replaced)


class _Collector:
    """A :data:`neurallm.evaluation.WindowScorer` that keeps the log-probability of every scored target, column by
    column in order (the NLL it returns is their negated sum), and with ``top`` the ``top`` most likely
    (id, log-probability) pairs at each scored position too."""

    def __init__(self, model: LanguageModel, n_columns: int, top: int = 0) -> None:
        self.model, self.top = model, top
        self.columns: list[list[np.ndarray]] = [[] for _ in range(n_columns)]
        self.tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n_columns)]

    def __call__(self, features: torch.Tensor, targets: torch.Tensor, scored: np.ndarray) -> torch.Tensor:
        flat = np.flatnonzero(scored)  # row-major over (w, B): in order of position within each column
        if flat.size == 0:
            return torch.zeros((), dtype=torch.float64)
        index = torch.from_numpy(flat).to(features.device)
        scored_features = features.reshape(-1, features.size(-1)).index_select(0, index)
        scored_targets = targets.reshape(-1).index_select(0, index)
        pieces, tops = [], []
        # the output layer in slices: the log-probabilities of a whole window of many columns can take gigabytes
        for i in range(0, flat.size, HEAD_CHUNK):
            log_probs = self.model.head.log_probs(scored_features[i : i + HEAD_CHUNK])  # (n, V)
            pieces.append(log_probs.gather(1, scored_targets[i : i + HEAD_CHUNK, None])[:, 0])
            if self.top:
                best, best_ids = torch.topk(log_probs, min(self.top, log_probs.size(1)), dim=1)
                tops.extend(list(zip(i_, v_)) for i_, v_ in zip(best_ids.tolist(), best.double().tolist()))
        values = torch.cat(pieces).double().cpu().numpy()
        column_of = flat % scored.shape[1]
        for column in range(scored.shape[1]):
            self.columns[column].append(values[column_of == column])
            if self.top:
                self.tops[column].extend(tops[k] for k in np.flatnonzero(column_of == column))
        return torch.tensor(-values.sum(), dtype=torch.float64)


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
    ``echo`` and of clients that hold token ids rather than text. It runs exact evaluation's column runner, as
    :func:`score_lines` does.
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
            columns, window = [EvalColumn(0, 1, len(ids))], layout.window
        else:
            columns = plan_sliding_windows(len(ids), max(1, layout.window - context), context)
            window = max(column.length for column in columns)
        collected = _Collector(model, len(columns), top)
        run_columns_from(model, array, columns, window, collected)
    finally:
        model.train(was_training)
    logprobs = [float(v) for values in collected.columns for piece in values for v in piece]
    return IdScores(logprobs, [t for tops in collected.tops for t in tops])
