"""What an epoch leaves in the run's record: one ``metrics.jsonl`` line, and the log line that says it.

The same record also closes a --max-time stop in the middle of an epoch, marked ``"complete": false``.
"""

from __future__ import annotations

from neurallm.evaluation import EvalResult


def epoch_record(*, epoch: int, complete: bool, train_loss: float, valid: EvalResult, lr: float, seconds: float,
                 tokens_per_s: float, mfu: float | None, level: str) -> dict:
    """One metrics.jsonl record.

    Args:
        epoch: the epoch, counting from 1 (a partial one counts as the epoch it belongs to).
        complete: whether the epoch was trained to its end.
        train_loss: mean training loss of the epoch's steps, all ranks (nats per token).
        valid: the validation of the weights after it (NT-ASGD: of the averaged weights).
        lr: the learning rate at its end.
        seconds: wall time of the epoch (or of its resumed part).
        tokens_per_s: training tokens per second of all ranks.
        mfu: model FLOPs utilisation, or None where unknown.
        level: the tokenizer level (``char`` adds ``valid_bpc``).
    """
    record = {
        "epoch": epoch,
        "complete": complete,
        "train_loss": train_loss,
        "valid_loss": valid.loss,
        "valid_ppl": valid.ppl,
        "lr": lr,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None if mfu is None else round(mfu, 4),  # Transformers on a GPU of known peak
        "valid_tokens": valid.tokens,
    }
    if level == "char":
        record["valid_bpc"] = valid.bpc
    if valid.bpb is not None:
        record["valid_bpb"] = valid.bpb
    return record


def epoch_line(record: dict, *, seconds: float, mfu: float | None, batches: tuple[int, int]) -> str:
    """The end-of-epoch line of the training log, in the PyTorch example's format plus speed (``seconds`` and
    ``mfu`` unrounded; ``batches``: windows trained of the epoch's, for a stop in mid-epoch)."""
    mfu_text = "" if mfu is None else f" | MFU {mfu:.1%}"
    # a stop in mid-epoch (--max-time, Ctrl-C) is not an epoch: the line says how much of it ran
    ended = f"end of epoch {record['epoch']:3d}" if record["complete"] else \
        f"epoch {record['epoch']} stopped after {batches[0]:,} of {batches[1]:,} batches"
    return (f"| {ended} | time {seconds:6.1f}s | train loss {record['train_loss']:.3f} | "
            f"valid loss {record['valid_loss']:.3f} | valid ppl {record['valid_ppl']:9.2f} | lr {record['lr']:.3g} | "
            f"{record['tokens_per_s']:,.0f} tok/s{mfu_text}")
