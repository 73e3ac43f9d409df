"""When a result built on a corpus is not worth trusting: splits too small, and targets that are mostly ``<unk>``.

Both are checked from the counts a prepared corpus records in ``meta.json`` (no id is read), and said as warnings
by ``prepare``, ``train`` (when it starts, and beside its test result) and ``eval``:

* **A split too small.** A perplexity is a mean over the tokens scored; per-token losses of a word model spread
  over about 2.5 nats (one standard deviation), so a mean over ``n`` tokens is off by about ``2.5 / sqrt(n)`` nats
  from one sample of text to the next, before counting that neighbouring tokens are not independent: ±6% of
  perplexity at 2,000 tokens, ±20% at 180 (the test split a sorted CSV with an empty tail gave, issue 21).
* **Many ``<unk>`` targets.** Predicting ``<unk>`` is easy (one token stands for every unknown word), so a corpus
  mostly ``<unk>`` scores a deceptively *low* perplexity: with ``--min-freq`` so high that 93% of the tokens became
  ``<unk>``, training reported test ppl 1.10. The share counts every target that is ``<unk>``, whatever made it
  so: a word the vocabulary lacks, or a ``<unk>`` written in the text itself (Penn Treebank's own: about 5% of
  its test targets).
* **A space-separated character file at char level** (``ptb.char.*``: ``a e r _ b a n k``): every other token is
  a separator the model must predict, so bits per character are halved and mean nothing. Read at ``--level
  word``, each character is one token and the separators are gone.
"""

from __future__ import annotations

import logging

# Below this many tokens a split's perplexity is too noisy to compare runs with (see the module docstring).
SMALL_SPLIT_TOKENS = 2000
# English text is about 17% spaces; a file whose characters are separated by spaces is about 50%.
SPACE_SEPARATED_SHARE = 0.35
# Above this share of <unk> targets perplexity flatters the model (see the module docstring). A run's own
# WikiText-2 test split has 0% <unk> replacements; its own "<unk>" words are part of the text and are counted.
UNK_WARN_SHARE = 0.05


def unk_target_share(counts: dict) -> float:
    """Share of a split's targets (every token but the first) that are ``<unk>``, from its ``meta.json`` counts;
    a corpus prepared before the targets were counted gives its replacements only."""
    tokens = int(counts.get("tokens", 0))
    unk = counts.get("unk_targets", counts.get("unk", 0))
    return int(unk) / max(1, tokens - 1)


def unk_shares(counts: dict) -> tuple[float, float | None]:
    """The share of ``<unk>`` targets and the part of it that replaced words the vocabulary lacks (None for a corpus
    prepared before the targets were counted); the replacements are counted over every token, the first too, so
    the part is capped at the share."""
    share = unk_target_share(counts)
    if "unk_targets" not in counts:
        return share, None
    return share, min(share, int(counts.get("unk", 0)) / max(1, int(counts.get("tokens", 0)) - 1))


def small_split_warning(split: str, tokens: int) -> str | None:
    """The warning for a ``split`` of ``tokens`` tokens, or None when it is large enough."""
    if tokens >= SMALL_SPLIT_TOKENS:
        return None
    return (f"warning: the {split} split has only {tokens:,} tokens, fewer than {SMALL_SPLIT_TOKENS:,}: a perplexity "
            f"measured on it is too noisy to compare (±{_noise(tokens):.0%} or more); give more text, a larger share "
            "with --split-ratios, or --split-by documents if the file is sorted")


def _noise(tokens: int) -> float:
    import math

    return math.exp(2.5 / math.sqrt(max(1, tokens))) - 1


def unk_warning(share: float, what: str, replaced: float | None = None) -> str | None:
    """The warning when more than :data:`UNK_WARN_SHARE` of ``what`` (targets, named) are ``<unk>``, else None;
    ``replaced`` is the part of ``share`` that was not in the vocabulary (the rest is ``<unk>`` in the text)."""
    if share <= UNK_WARN_SHARE:
        return None
    parts = ""
    if replaced is not None:
        parts = f" ({replaced:.1%} not in the vocabulary, {max(0.0, share - replaced):.1%} written <unk> in the text)"
    return (f"warning: {share:.1%} of the {what} are <unk>{parts}, which makes perplexity look better than it is; "
            "compare perplexities only at similar <unk> shares")


def corpus_warnings(meta: dict, splits: tuple[str, ...] | None = None) -> list[str]:
    """Warnings about the splits of a prepared corpus (its ``meta.json``): too small, or too many ``<unk>`` targets."""
    warnings = []
    space_share = meta.get("char_space_share")
    if isinstance(space_share, (int, float)) and space_share > SPACE_SEPARATED_SHARE:
        warnings.append(f"hint: {space_share:.0%} of the train characters are spaces: this looks like a space-separated "
                        "character file (like ptb.char.*), whose separators are half the tokens at --level char; "
                        "prepare it with --level word to make each character one token without them")
    entries = meta.get("splits", {})
    for split in splits or tuple(entries):
        counts = entries.get(split)
        if not isinstance(counts, dict):
            continue
        tokens = int(counts.get("tokens", 0))
        share, replaced = unk_shares(counts)
        # a small train split is no measurement: only valid and test results are quoted
        for warning in (small_split_warning(split, tokens) if split != "train" else None,
                        unk_warning(share, f"{split} targets", replaced)):
            if warning is not None:
                warnings.append(warning)
    return warnings


def log_corpus_warnings(meta: dict, logger: logging.Logger, splits: tuple[str, ...] | None = None) -> list[str]:
    """Log :func:`corpus_warnings` at WARNING level (the CLI prints them to stderr); return them."""
    warnings = corpus_warnings(meta, splits)
    for warning in warnings:
        logger.warning(warning)
    return warnings
