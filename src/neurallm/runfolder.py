"""The run folder: its files, who may replace it, and one bounded, validated reader and writer per file.

::

    RUN/
      config.json        all settings (data, tokenizer, vocabulary, model, training)
      vocab.json         the vocabulary
      tokenizer.json     the trained BPE (--tokenizer bpe only; the tokenizers library's format)
      model.safetensors  weights with the best validation loss so far      (neurallm.weights reads them)
      last.safetensors   latest weights + the training state for --resume  (neurallm.training.checkpoint)
      metrics.jsonl      one JSON line per epoch (partial epochs too)
      results.json       test-set evaluation of the best model at the end of training
      curves.png         the training curves, redrawn after every epoch
      tensorboard/       TensorBoard event files, when training writes them
      .neurallm.lock     while a process writes the run: its PID (see :mod:`neurallm.locking`)

This module needs no torch: loading, evaluating, generating, serving, exporting and plotting a run read the
folder through it and never import :mod:`neurallm.training`.

Every file is written to a temp file in RUN, fsynced and renamed (:mod:`neurallm.fileio`), so a `kill -9` at any
moment leaves either the previous or the new version of each.

A run folder may have been crafted or damaged, so every read is bounded and validated before anything uses it:
each file is read only if it is a regular file and below its size cap (a symlink to ``/dev/zero`` or a FIFO
fails at once, it never grows memory or hangs), then checked for the types and ranges its users rely on. Each
failure is one line naming the file. Facts derived from training (``metrics.jsonl``, ``results.json``) are
decoration for ``serve``: there a damaged one is left out of the page rather than stopping the server.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from neurallm.run_config import RunConfig
from neurallm.data.bpe import BPE, MAX_TOKENIZER_BYTES, TOKENIZER_FILE
from neurallm.data.tokenizers import TokenizerSettings
from neurallm.data.vocab import MAX_VOCAB_BYTES, VOCAB_FILE, Vocab
from neurallm.errors import ConfigError, DataError, RunDirError
from neurallm.fileio import atomic_write, atomic_write_json, atomic_write_text, is_temp_file, read_bounded_text
from neurallm.locking import LOCK_FILE, FolderLock, check_not_locked, lock_folder
from neurallm.elastic import LAUNCH_FILE

CONFIG_FILE = "config.json"
BEST_FILE = "model.safetensors"
LAST_FILE = "last.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"  # a folder: TensorBoard's event files (events.out.tfevents.*)
# Every file a run writes: the ONE list `--force` checks, so a folder holding anything else is never deleted, and
# the list of names no output flag may write over. A feature that adds a file to runs adds its name here.
RUN_FILES = (CONFIG_FILE, VOCAB_FILE, BEST_FILE, LAST_FILE, METRICS_FILE, RESULTS_FILE, CURVES_FILE, TOKENIZER_FILE,
             LOCK_FILE, LAUNCH_FILE, TENSORBOARD_DIR)

# Size caps for reading a possibly crafted run folder, each far above what neurallm writes: config.json is a few
# KB; vocab.json about 20 bytes a token (wikitext-103's 267k tokens: ~5 MB; cap in data/vocab.py); tokenizer.json
# about 60 bytes a token (cap in data/bpe.py); metrics.jsonl ~350 bytes an epoch; results.json under 1 KB.
MAX_CONFIG_BYTES = 1 << 20
MAX_METRICS_BYTES = 64 << 20
MAX_RESULTS_BYTES = 1 << 20
MAX_EPOCH = 10**9
_WHAT = "a training run"
DAMAGED = "the run directory is damaged"


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds a ``config.json`` (what makes a folder a run; :func:`read_run_config` checks it)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def run_file_named(path: Path, *, extra_runs: Iterable[Path] = ()) -> str | None:
    """``"RUN's own model.safetensors"`` if ``path`` (already resolved) names a file of a run folder, else None.

    A run folder is any folder with a ``config.json``, or one of ``extra_runs`` (a run about to be written);
    its files are the names in :data:`RUN_FILES`, temp files of atomic writes, and anything in its TensorBoard
    folder. The output paths of every command are checked with this (:func:`neurallm.outputs.check_output_path`).
    """
    path = Path(path)
    runs = {Path(os.path.realpath(run)) for run in extra_runs}
    if path.is_dir() and (path in runs or is_run_dir(path)):
        return f"the run folder {path} itself"
    for depth, folder in enumerate(path.parents):
        if folder not in runs and not is_run_dir(folder):
            continue
        relative = path.relative_to(folder)
        first = relative.parts[0]
        if depth == 0 and (first in RUN_FILES or is_temp_file(first)):
            return f"the run {folder}'s own {first}"
        if first == TENSORBOARD_DIR:
            return f"a file in the run {folder}'s {TENSORBOARD_DIR} folder"
    return None


# --- a new run: claiming the folder ------------------------------------------------------------------------


def _is_tensorboard_dir(path: Path) -> bool:
    """A real folder (not a symlink) holding nothing but TensorBoard event files, in sub-folders or not."""
    if path.is_symlink() or not path.is_dir():
        return False
    for root, dirs, files in os.walk(path):
        if any(Path(root, d).is_symlink() for d in dirs):
            return False
        for name in files:
            if Path(root, name).is_symlink() or not name.startswith("events.out.tfevents."):
                return False
    return True


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that a run does not write (anything but RUN_FILES and temp files as plain files, and a
    TensorBoard folder of event files)."""
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name == TENSORBOARD_DIR:
            known = _is_tensorboard_dir(Path(entry.path))
        else:
            known = (entry.name in RUN_FILES or is_temp_file(entry.name)) and entry.is_file(follow_symlinks=False)
        if not known:
            foreign.append(entry.name)
    return foreign


def _why_not_a_run(folder: Path) -> str | None:
    """None if ``folder`` is provably a neurallm run (config parses, nothing foreign in it); else the reason."""
    if not is_run_dir(folder):
        return f"it has no {CONFIG_FILE}"
    try:
        read_run_config(folder)
    except RunDirError as exc:
        return f"its {CONFIG_FILE} is not a neurallm run's ({exc})"
    foreign = foreign_entries(folder)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds {shown}, which a run does not write"
    return None


def check_new_run_dir(folder: Path, force: bool, *, holding_lock: bool = False) -> None:
    """Raise unless ``folder`` can hold a new run: absent, empty, or (with ``force``) an old run to replace.

    Only checks; :func:`claim_new_run_dir` deletes, once everything else about the new run has been checked.
    ``--force`` deletes only a folder that is provably a neurallm run: its config.json parses as one and it
    holds nothing but what a run writes (RUN_FILES, temp files, a TensorBoard folder of event files), so a typo
    cannot wipe a source tree.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--out {folder} is a file; name a folder for the run")
    if not folder.is_dir():
        return
    if not holding_lock:
        check_not_locked(folder)
    if not any(entry.name != LOCK_FILE for entry in os.scandir(folder)):
        return
    reason = _why_not_a_run(folder)
    if reason is not None:
        if force:
            raise RunDirError(f"--out {folder} is not a neurallm run ({reason}); refusing to delete it even with --force: "
                              "name a new or empty folder for the run")
        raise RunDirError(f"--out {folder} is a non-empty folder that is not a neurallm run ({reason}); "
                          "name a new or empty folder for the run")
    if not force:
        raise RunDirError(f"--out {folder} already exists and is not empty; use --resume to continue it or --force to replace it")


def claim_new_run_dir(folder: Path, force: bool) -> FolderLock:
    """Create (or, with ``force``, empty) the run directory and return its lock, held for the whole run.

    The checks of :func:`check_new_run_dir` run again under the lock, so a process that started training in
    ``folder`` since they last ran is not overwritten. Only what a run writes is deleted, one file at a time.
    """
    folder = Path(folder)
    check_new_run_dir(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(folder, _WHAT)
    try:
        check_new_run_dir(folder, force, holding_lock=True)
        for name in os.listdir(folder):
            if name == TENSORBOARD_DIR:
                shutil.rmtree(folder / name)  # checked above: a real folder of event files only
            elif name != LOCK_FILE:
                (folder / name).unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def lock_run_dir(folder: Path) -> FolderLock:
    """The exclusive lock of an existing run (for ``--resume``); raises naming the PID of a process holding it."""
    return lock_folder(Path(folder), _WHAT)


def check_run_dir_still_there(folder: Path) -> None:
    """Raise if the run directory was deleted or moved while training, rather than recreate it without its config."""
    if not (Path(folder) / CONFIG_FILE).is_file():
        raise RunDirError(f"{folder} (or its {CONFIG_FILE}) was deleted or moved while training; stopped without writing "
                          "anything, so no half run is recreated there")


def write_run_file(path: Path, write) -> None:
    """``atomic_write(path, write)`` into a run directory that must still be there: checked before the write and after."""
    folder = Path(path).parent
    check_run_dir_still_there(folder)
    try:
        atomic_write(path, write, create_parent=False)
    except FileNotFoundError:
        # only another program deletes files in a locked run folder: most likely the folder is being deleted
        raise RunDirError(f"{folder}: a checkpoint being written was deleted from it while training (was the run folder "
                          "deleted or moved?); stopped without recreating it") from None
    if not (folder / CONFIG_FILE).is_file():
        # deleted during the write, which (making its temp file) created the folder again: undo that
        Path(path).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty: someone else's files, left alone
        check_run_dir_still_there(folder)


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files a killed process left in a run directory. Call only while holding the run's lock:
    without it, the temp file could be another live process's half-written checkpoint."""
    for path in Path(folder).iterdir():
        if path.is_file() and is_temp_file(path.name):
            path.unlink(missing_ok=True)


# --- config, vocabulary, tokenizer ---------------------------------------------------------------------------


def write_run_files(folder: Path, config: RunConfig, vocab: Vocab) -> None:
    """Write config.json, vocab.json and (BPE) tokenizer.json."""
    # config.json first: from then on the folder parses as a run, so `--force` may replace it after a crash
    atomic_write_json(Path(folder) / CONFIG_FILE, config.to_dict())
    atomic_write_text(Path(folder) / VOCAB_FILE, vocab.to_json())
    if vocab.bpe is not None:
        atomic_write_text(Path(folder) / TOKENIZER_FILE, vocab.bpe.to_json())


def read_run_config(folder: Path) -> RunConfig:
    """The run's settings from config.json (bounded, every value type- and range-checked)."""
    folder = Path(folder)
    if not folder.exists():
        raise RunDirError(f"{folder}: no such run directory; train one with `neurallm train --out {folder}`")
    if not is_run_dir(folder):
        raise RunDirError(f"{folder} is not a neurallm run directory (no {CONFIG_FILE}); give the --out folder of `neurallm train`")
    path = folder / CONFIG_FILE
    data = _read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a JSON object; {DAMAGED}")
    try:
        return RunConfig.from_dict(data, str(path))
    except ConfigError as exc:
        raise RunDirError(str(exc)) from None


def read_vocab(folder: Path, tokenizer: TokenizerSettings) -> Vocab:
    """The run's vocabulary, with its trained BPE at level ``bpe`` (where tokenizer.json is required)."""
    path = Path(folder) / VOCAB_FILE
    vocab = Vocab.from_json(read_bounded_text(path, MAX_VOCAB_BYTES, "the run directory is incomplete or damaged"), path)
    if tokenizer.level == "bpe":
        vocab.bpe = read_tokenizer(folder)
        if vocab.bpe.vocabulary() != vocab.tokens:
            raise RunDirError(f"{Path(folder) / TOKENIZER_FILE} does not match {path} (another vocabulary); {DAMAGED}")
    return vocab


def read_tokenizer(folder: Path) -> BPE:
    """The trained BPE of a ``--tokenizer bpe`` run: without it its tokens cannot be turned into text or back."""
    path = Path(folder) / TOKENIZER_FILE
    if not os.path.lexists(path):
        raise RunDirError(f"{path} is missing: this BPE run cannot encode or decode text without it; "
                          "copy it back from the run's prepared corpus or train the run again")
    text = read_bounded_text(path, MAX_TOKENIZER_BYTES, DAMAGED)
    try:
        return BPE.from_json(text, path)
    except DataError as exc:
        raise RunDirError(str(exc)) from None


# --- metrics.jsonl and results.json ---------------------------------------------------------------------------

# Numbers an epoch record must hold (finite), and ones it may hold (finite, or null); valid_ppl may be infinite
# (exp of a loss above ~709).
_RECORD_NUMBERS = ("train_loss", "valid_loss", "lr")
_RECORD_OPTIONAL = ("seconds", "tokens_per_s", "mfu", "valid_tokens", "valid_bpc", "valid_bpb")


def _read_json(path: Path, max_bytes: int):
    text = read_bounded_text(path, max_bytes, DAMAGED)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer of over 4,300 digits
        raise RunDirError(f"{path} cannot be read as JSON ({exc}); {DAMAGED}") from None


def _is_number(value, *, finite: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        as_float = float(value)  # a 400-digit integer overflows here
    except OverflowError:
        return False
    return math.isfinite(as_float) or (not finite and not math.isnan(as_float))


def _check_numbers(values: dict, keys: tuple[str, ...], where: str, *, label: str = "", required: bool = False,
                   finite: bool = True) -> None:
    """Raise a RunDirError naming ``where`` unless each of ``keys`` in ``values`` is a number (finite unless
    ``finite`` is False); a missing or null one is allowed unless ``required``."""
    for key in keys:
        value = values.get(key)
        if (value is not None or required) and not _is_number(value, finite=finite):
            kind = "finite number" if finite else "number"
            raise RunDirError(f"{where}: {label}{key} is {json.dumps(value)[:40]}, not a {kind}; {DAMAGED}")


def check_metric_record(record, where: str) -> dict:
    """``record`` if it is a sound epoch record (``epoch`` a whole number 1.., losses and rate finite numbers);
    else a RunDirError naming ``where`` ("RUN/metrics.jsonl line 3")."""
    if not isinstance(record, dict):
        raise RunDirError(f"{where} is {json.dumps(record)[:40]}, not an epoch record (a JSON object); {DAMAGED}")
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise RunDirError(f"{where}: epoch is {json.dumps(epoch)[:40]}, not a whole number from 1; {DAMAGED}")
    _check_numbers(record, _RECORD_NUMBERS, where, required=True)
    _check_numbers(record, _RECORD_OPTIONAL, where)
    _check_numbers(record, ("valid_ppl",), where, finite=False)
    if not isinstance(record.get("complete", True), bool):
        raise RunDirError(f"{where}: complete is {json.dumps(record['complete'])[:40]}, not true or false; {DAMAGED}")
    return record


def read_metrics(folder: Path) -> list[dict]:
    """The epoch records of ``RUN/metrics.jsonl``, each checked (:func:`check_metric_record`); [] if there is none yet."""
    path = Path(folder) / METRICS_FILE
    if not os.path.lexists(path):
        return []
    text = read_bounded_text(path, MAX_METRICS_BYTES, DAMAGED)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise RunDirError(f"{where} is not JSON ({exc}); {DAMAGED}") from None
        records.append(check_metric_record(record, where))
    return records


def write_metrics(folder: Path, records: list[dict]) -> None:
    """Rewrite metrics.jsonl from the records kept in the checkpoint, so the two always agree."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_run_file(Path(folder) / METRICS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# results.json: its entries, with the kinds of value each may hold (others are kept unchecked)
_TEST_NUMBERS = ("loss", "bpc", "bpb", "unk_share", "seconds")


def check_results(results, where: str) -> dict:
    """``results`` if it is a sound results.json object (a ``test`` object of finite numbers …); else RunDirError."""
    if not isinstance(results, dict):
        raise RunDirError(f"{where} is not a JSON object; {DAMAGED}")
    test = results.get("test")
    if test is not None:
        if not isinstance(test, dict):
            raise RunDirError(f"{where}: test is {json.dumps(test)[:40]}, not an object; {DAMAGED}")
        _check_numbers(test, _TEST_NUMBERS, where, label="test.")
        _check_numbers(test, ("ppl",), where, label="test.", finite=False)
        tokens = test.get("tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise RunDirError(f"{where}: test.tokens is {json.dumps(tokens)[:40]}, not a count; {DAMAGED}")
    epochs = results.get("epochs_completed")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= MAX_EPOCH):
        raise RunDirError(f"{where}: epochs_completed is {json.dumps(epochs)[:40]}, not a count; {DAMAGED}")
    if results.get("stopped_by") is not None and not isinstance(results["stopped_by"], str):
        raise RunDirError(f"{where}: stopped_by is not a string; {DAMAGED}")
    return results


def read_results(folder: Path) -> dict | None:
    """The checked ``RUN/results.json``; None if training has not written it (it stopped before the test)."""
    path = Path(folder) / RESULTS_FILE
    if not os.path.lexists(path):
        return None
    return check_results(_read_json(path, MAX_RESULTS_BYTES), str(path))


def write_results(folder: Path, results: dict) -> None:
    """Write results.json into a run folder that must still be there (like every checkpoint file)."""
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    write_run_file(Path(folder) / RESULTS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
