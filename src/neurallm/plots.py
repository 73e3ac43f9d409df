"""Training curves as PNG: ``RUN/curves.png`` after every epoch, and ``neurallm plot`` to overlay runs.

Left panel: train and validation loss by epoch (nats per token), with the learning rate on a second axis.
Right panel: validation perplexity (word level) or bits per character (character level), the number
people quote. Runs of different levels are compared in bits per token, the one unit both share.

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot, no display, no process-wide
backend switch, so a notebook's or an application's own matplotlib settings are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from neurallm.errors import RunDirError
from neurallm.outputs import OutputTarget, check_output_path, output_path
from neurallm.runfolder import CURVES_FILE, METRICS_FILE, read_metrics, read_run_config, write_run_file


@dataclass
class Curves:
    """The per-epoch numbers of one run, ready to draw.

    Attributes:
        label: legend name (the run folder's name).
        level: ``word`` or ``char``.
        epochs: epoch of each point (an epoch cut short by ``--max-time`` counts as the epoch it was in).
        train_loss, valid_loss: nats per token.
        lr: learning rate at the end of each epoch.
    """

    label: str
    level: str
    epochs: list[int]
    train_loss: list[float]
    valid_loss: list[float]
    lr: list[float]

    @classmethod
    def from_metrics(cls, label: str, level: str, records: list[dict]) -> "Curves":
        # A resumed epoch leaves a partial record and then the complete one under the same number: keep the last.
        by_epoch = {int(r["epoch"]): r for r in records}
        ordered = [by_epoch[e] for e in sorted(by_epoch)]
        return cls(label, level, [int(r["epoch"]) for r in ordered], [float(r["train_loss"]) for r in ordered],
                   [float(r["valid_loss"]) for r in ordered], [float(r["lr"]) for r in ordered])


def read_run_curves(run_dir: Path) -> Curves:
    """The curves of a run directory, from its ``metrics.jsonl`` and ``config.json`` (both read bounded and checked)."""
    run_dir = Path(run_dir)
    level = read_run_config(run_dir).tokenizer.level
    records = read_metrics(run_dir)
    if not records:
        raise RunDirError(f"{run_dir} has no finished epoch yet (its {METRICS_FILE} is empty or missing: the run stopped "
                          "before its first epoch ended); plot it after its first epoch")
    return Curves.from_metrics(run_dir.resolve().name, level, records)


def write_run_curves(run_dir: Path, records: list[dict], level: str) -> Path:
    """Draw ``RUN/curves.png`` from the run's metric records (called by the trainer after every epoch)."""
    run_dir = Path(run_dir)
    figure = draw_curves([Curves.from_metrics(run_dir.resolve().name, level, records)])
    # never creates the run folder: one deleted while training must not come back holding only this picture
    write_run_file(run_dir / CURVES_FILE, lambda tmp: figure.savefig(tmp, format="png"))
    return run_dir / CURVES_FILE


def plot_runs(run_dirs: list[Path], out: Path | str) -> Path:
    """Overlay the curves of several run directories in one PNG (``neurallm plot RUN [RUN…] --out FILE``;
    ``-``: standard output). ``out`` may not be a run's own file (see :func:`neurallm.outputs.check_output_path`)."""
    if not run_dirs:
        raise RunDirError("plot needs at least one run directory")
    target = check_output_path(out, "--out", stdout=True)  # before the runs are read: a refusal costs nothing
    return plot_curves([read_run_curves(Path(d)) for d in run_dirs], target)


def plot_curves(runs: list[Curves], out: Path | str | OutputTarget) -> Path:
    """Draw ``runs`` into the PNG ``out``, written atomically (a reader never sees half an image); returns ``out``."""
    target = out if isinstance(out, OutputTarget) else check_output_path(out, "--out", stdout=True)
    figure = draw_curves(runs)
    with output_path(target) as tmp:
        figure.savefig(tmp, format="png")
    return Path(target.given)


def draw_curves(runs: list[Curves]):
    """The figure of ``runs``: losses and learning rate on the left, validation perplexity or bpc on the right.

    A ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot), so it changes no process-wide state.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    fig = Figure(figsize=(11, 4.6), dpi=100)
    # fixed margins rather than constrained layout, which doubles the drawing time (this runs every epoch)
    ax_loss, ax_quality = fig.subplots(1, 2, gridspec_kw={"left": 0.065, "right": 0.975, "bottom": 0.18, "top": 0.93, "wspace": 0.42})
    ax_lr = ax_loss.twinx()
    quality_name, to_quality = _quality({run.level for run in runs})
    handles = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax_loss.plot(run.epochs, run.train_loss, color=color, linestyle="--", marker="o", markersize=3)
        ax_loss.plot(run.epochs, run.valid_loss, color=color, linestyle="-", marker="o", markersize=4)
        # the recorded rate is the one used during the epoch: a flat segment across it
        steps_x = [x for epoch in run.epochs for x in (epoch - 0.5, epoch + 0.5)]
        steps_y = [lr for lr in run.lr for _ in range(2)]
        ax_lr.plot(steps_x, steps_y, color=color, linestyle=":", linewidth=1.4, alpha=0.8)
        quality = [to_quality(loss) for loss in run.valid_loss]
        ax_quality.plot(run.epochs, quality, color=color, marker="o", markersize=4)
        ax_quality.annotate(f"{quality[-1]:.4g}", (run.epochs[-1], quality[-1]), textcoords="offset points",
                            xytext=(7, 0), ha="left", va="center", fontsize=8, color=color)
        handles.append(Line2D([], [], color=color, linewidth=6, label=run.label))
    handles += [Line2D([], [], color="0.3", linestyle="--", marker="o", markersize=3, label="train loss"),
                Line2D([], [], color="0.3", linestyle="-", marker="o", markersize=4, label="valid loss"),
                Line2D([], [], color="0.3", linestyle=":", label="learning rate (right axis)")]
    ax_loss.set_title("loss by epoch")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_lr.set_ylabel("learning rate", color="0.35")
    ax_lr.tick_params(axis="y", colors="0.35")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    all_lr = [lr for run in runs for lr in run.lr if lr > 0]
    if all_lr and max(all_lr) / min(all_lr) > 10:
        ax_lr.set_yscale("log")  # SGD divides by 4 on every plateau: steps read best on a log axis
        decades = math.log10(max(all_lr) / min(all_lr))
        ax_lr.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
        ax_lr.yaxis.set_major_formatter(plain)
        ax_lr.yaxis.set_minor_formatter(NullFormatter())
    elif all_lr:
        ax_lr.set_ylim(0, 1.15 * max(all_lr))  # from zero: a constant rate is a flat line, not a zoomed-in tick range
    ax_quality.set_title(f"validation {quality_name}")
    ax_quality.set_ylabel(quality_name)
    valid_losses = [loss for run in runs for loss in run.valid_loss]
    if quality_name == "perplexity" and max(valid_losses) - min(valid_losses) > 1:
        ax_quality.set_yscale("log")  # perplexity spans orders of magnitude in the first epochs
        ax_quality.yaxis.set_major_formatter(plain)
        ax_quality.yaxis.set_minor_formatter(plain)
    for ax in (ax_loss, ax_quality):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(min(run.epochs) for run in runs) - 0.5, max(max(run.epochs) for run in runs) + 0.5)
        ax.margins(y=0.08)
        ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6), fontsize=9, frameon=False)
    return fig


def _quality(levels: set[str]):
    """The right panel's unit: perplexity for word runs, bpc for character runs, bits per token for a mix."""
    if levels == {"word"}:
        return "perplexity", lambda loss: math.exp(min(loss, 700.0))
    if levels == {"char"}:
        return "bits per character", lambda loss: loss / math.log(2)
    return "bits per token", lambda loss: loss / math.log(2)
