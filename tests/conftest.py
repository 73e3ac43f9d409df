"""Shared fixtures: the read-only corpora beside the repository and small synthetic corpora."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Resolved, as neurallm resolves the data folders it finds (config.json records where a corpus was found): where
# ../shared is a symlink (a CI layout, a worktree), an unresolved path would differ from every path neurallm reports.
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Prepared corpora go to a temp cache, never to the user's ~/.cache."""
    os.environ["NEURALLM_CACHE"] = str(tmp_path_factory.mktemp("neurallm-cache"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; more threads only spin against each other on a small machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wt2-lite" / "train.txt").is_file():
        pytest.skip(f"corpora not found at {SHARED_DATA}")
    return SHARED_DATA


def write_patterned_corpus(folder: Path, *, lines: int = 300, seed: int = 0) -> Path:
    """A word corpus with learnable structure (fixed phrases), split into train/valid/test files."""
    rng = random.Random(seed)
    phrases = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song",
               "we read the book today", "the sun is hot and bright"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 5), ("test", lines // 5)):
        text = "\n".join(" ".join(rng.choice(phrases) for _ in range(2)) for _ in range(n)) + "\n"
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_patterned_corpus(tmp_path / "tiny")


TINY_MODEL = dict(emsize=16, nhid=16, nlayers=1, dropout=0.0, batch_size=4, bptt=8, epochs=1, lr=2.0,
                  eval_batch_size=2, seed=7)


TRAINED_RUN_EPOCHS = 2  # `--resume --epochs TRAINED_RUN_EPOCHS + 1` trains one more epoch on a copy


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The session's one trained run: a tiny word-level LSTM, 2 epochs on ``trained_corpus``.

    Every file a run writes is there (config, vocabulary, best and last checkpoints, metrics, curves.png,
    results.json). It is shared by the whole session, so it is read-only: a test that changes a run takes
    ``run_copy`` (or calls ``copy_run``) instead. Training it again in a module fixture costs seconds per module.
    """
    import neurallm

    root = tmp_path_factory.mktemp("trained-run")
    corpus = write_patterned_corpus(root / "corpus", lines=200)
    settings = {**TINY_MODEL, "epochs": TRAINED_RUN_EPOCHS}
    neurallm.train(corpus, root / "run", progress=False, **settings)
    return root / "run"


@pytest.fixture(scope="session")
def trained_corpus(trained_run) -> Path:
    """The train/valid/test folder ``trained_run`` was trained on (read-only)."""
    return trained_run.parent / "corpus"


def copy_run(run: Path, destination: Path) -> Path:
    """A private copy of the run folder ``run`` at ``destination`` (which must not exist); returns it."""
    shutil.copytree(run, destination)
    return destination


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A fresh copy of ``trained_run`` in this test's temp folder, free to change or damage."""
    return copy_run(trained_run, tmp_path / "run")


@contextmanager
def serving(app) -> Iterator[int]:
    """``app`` served by a real uvicorn on 127.0.0.1 (a free port), in a thread; yields the port."""
    import threading
    import time

    import uvicorn

    from neurallm.server import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def live_server(trained_run):
    """``trained_run`` served by a real uvicorn on 127.0.0.1 (a free port), in a thread; yields the base URL."""
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
    import neurallm
    from neurallm.config import ServeConfig
    from neurallm.server.app import create_app

    with serving(create_app(neurallm.load_run(trained_run), ServeConfig(max_tokens=200))) as port:
        yield f"http://127.0.0.1:{port}"
