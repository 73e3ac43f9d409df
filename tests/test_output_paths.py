"""Writing an output never destroys anything else (neurallm.outputs.check_output_path and the atomic writer).

The rules, one test group each: a run folder's own files are never a target; a character device or a FIFO is
written through and stays what it was; a block device, a socket or a folder is refused; a symlink is followed
(the file it points to is written, the link stays); ``-`` is standard output where that makes sense. The
devices used are symlinks to ``/dev/null`` and nodes made in a temp folder, never the system's own.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from neurallm import runfolder
from neurallm.cli import main
from neurallm.errors import OutputPathError
from neurallm.fileio import atomic_write_text
from neurallm.outputs import check_output_path, output_path

REPO = Path(__file__).resolve().parents[1]


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"neurallm {command}: error: ")
    return err


def commands_writing(path: str, run: Path) -> dict[str, list[str]]:
    """Every command that writes a file a user names, writing ``path``."""
    return {
        "generate": ["generate", str(run), "--tokens", "3", "--out", path],
        "plot": ["plot", str(run), "--out", path],
        "export": ["export", str(run), "--onnx", path],
        "train-save": ["train", "--out", str(run), "--resume", "--epochs", "3", "--save", path, "--no-progress"],
        "train-onnx-export": ["train", "--out", str(run), "--resume", "--epochs", "3", "--onnx-export", path, "--no-progress"],
    }


COMMANDS = ["generate", "plot", "export", "train-save", "train-onnx-export"]


def skip_without_onnx(command: str) -> None:
    if "onnx" in command or command == "export":
        pytest.importorskip("onnx")


# --- a run's own files are never a target ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.safetensors", "last.safetensors", "config.json", "vocab.json", "metrics.jsonl",
                                  "results.json", "curves.png", ".neurallm.lock"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_runs_own_file_is_never_a_target(run_copy, capsys, command, name):
    skip_without_onnx(command)
    before = snapshot(run_copy)
    assert main(commands_writing(str(run_copy / name), run_copy)[command]) == 1
    err = one_error_line(capsys, command.split("-")[0])
    assert f"{run_copy}'s own {name}, which neurallm never writes over" in err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_symlink_to_a_run_file_is_refused_as_the_file_it_names(run_copy, tmp_path, capsys, command):
    skip_without_onnx(command)
    link = tmp_path / "innocent.bin"
    link.symlink_to(run_copy / "model.safetensors")
    before = snapshot(run_copy)
    assert main(commands_writing(str(link), run_copy)[command]) == 1
    assert "own model.safetensors" in one_error_line(capsys, command.split("-")[0])
    assert snapshot(run_copy) == before and link.is_symlink()


def test_a_path_through_a_symlinked_folder_into_a_run_is_refused(run_copy, tmp_path, capsys):
    (tmp_path / "elsewhere").symlink_to(run_copy)
    assert main(["plot", str(run_copy), "--out", str(tmp_path / "elsewhere" / "model.safetensors")]) == 1
    assert "own model.safetensors" in one_error_line(capsys, "plot")


def test_train_save_into_the_new_run_it_is_about_to_write_is_refused_before_training(tmp_path, capsys):
    from conftest import write_patterned_corpus

    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    out = tmp_path / "new-run"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--save", str(out / "config.json"), "--no-progress"]
    assert main(argv) == 1
    assert "own config.json" in one_error_line(capsys, "train")
    assert not out.exists()  # refused before anything was made


def test_a_runs_tensorboard_folder_and_the_run_folder_itself_are_never_targets(run_copy):
    (run_copy / runfolder.TENSORBOARD_DIR).mkdir()
    with pytest.raises(OutputPathError, match="tensorboard folder"):
        check_output_path(run_copy / runfolder.TENSORBOARD_DIR / "events.out.tfevents.1", "--out")
    with pytest.raises(OutputPathError, match="the run folder .* itself"):
        check_output_path(run_copy, "--hf", folder=True)
    assert check_output_path(run_copy / "samples.txt", "--out").path == run_copy.resolve() / "samples.txt"


def test_a_file_named_like_a_run_file_outside_a_run_is_an_ordinary_target(tmp_path, capsys):
    assert check_output_path(tmp_path / "config.json", "--out").path == tmp_path.resolve() / "config.json"


# --- devices, FIFOs, sockets: written through or refused, never replaced -----------------------------------------


def test_generate_writes_through_a_symlink_to_dev_null_and_leaves_both_as_they_were(trained_run, tmp_path, capsys):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert main(["generate", str(trained_run), "--tokens", "5", "--out", str(link)]) == 0
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("command", ["generate", "plot", "export", "train-save"])
def test_a_character_device_is_written_through_never_replaced(run_copy, tmp_path, capsys, command):
    skip_without_onnx(command)
    node = tmp_path / "null-device"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the same device as /dev/null, made here
    except PermissionError:
        pytest.skip("making a device node needs root")
    assert main(commands_writing(str(node), run_copy)[command]) == 0, capsys.readouterr().err
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def read_fifo_in_background(fifo: Path) -> dict:
    got: dict = {}

    def reader():
        with open(fifo, "rb") as f:
            got["bytes"] = f.read()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    got["thread"] = thread
    return got


@pytest.mark.parametrize("command", ["generate", "plot"])
def test_a_fifo_is_written_through_and_stays_a_fifo(trained_run, tmp_path, capsys, command):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = read_fifo_in_background(fifo)
    assert main(commands_writing(str(fifo), trained_run)[command]) == 0
    got["thread"].join(30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if command == "plot":
        assert got["bytes"].startswith(b"\x89PNG")
    else:
        assert got["bytes"].decode().strip()  # the generated words came through the pipe


@pytest.mark.parametrize("command", ["generate", "plot"])
def test_a_socket_is_refused_and_stays_a_socket(trained_run, tmp_path, capsys, command):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        assert main(commands_writing(str(path), trained_run)[command]) == 1
        assert "is a socket" in one_error_line(capsys, command)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        server.close()


def test_a_block_device_is_refused(tmp_path):
    node = tmp_path / "disk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except PermissionError:
        pytest.skip("making a device node needs root")
    with pytest.raises(OutputPathError, match="is a block device"):
        check_output_path(node, "--onnx")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder", "socket"])
def test_the_atomic_writer_never_renames_over_what_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "target"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        (tmp_path / "real").write_text("kept")
        path.symlink_to(tmp_path / "real")
    elif kind == "folder":
        path.mkdir()
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    mode = os.lstat(path).st_mode
    with pytest.raises(OutputPathError, match="neurallm replaces only regular files"):
        atomic_write_text(path, "new")
    assert os.lstat(path).st_mode == mode
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- symlinks are followed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "plot"])
def test_a_symlink_is_followed_the_link_stays_and_its_file_is_written(trained_run, tmp_path, command):
    target = tmp_path / "real" / "output"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(commands_writing(str(link), trained_run)[command]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old" and target.stat().st_size > 0


def test_a_dangling_symlink_creates_the_file_it_points_to(trained_run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "made.png")
    assert main(["plot", str(trained_run), "--out", str(link)]) == 0
    assert link.is_symlink() and (tmp_path / "made.png").read_bytes().startswith(b"\x89PNG")


# --- `-`: standard output where it makes sense -----------------------------------------------------------------


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "neurallm", *argv], capture_output=True, env=env, timeout=300)


def test_generate_out_dash_is_standard_output(trained_run, tmp_path):
    result = cli("generate", str(trained_run), "--tokens", "5", "--seed", "3", "--out", "-")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.decode().split()) >= 5 and not (Path.cwd() / "-").exists()


def test_plot_out_dash_is_a_png_on_standard_output(trained_run):
    result = cli("plot", str(trained_run), "--out", "-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"\x89PNG") and b"wrote -" in result.stderr


@pytest.mark.parametrize("flag", ["--save", "--onnx-export"])
def test_train_outputs_refuse_standard_output_where_the_training_log_goes(run_copy, capsys, flag):
    if flag == "--onnx-export":
        pytest.importorskip("onnx")
    assert main(["train", "--out", str(run_copy), "--resume", "--epochs", "3", flag, "-", "--no-progress"]) == 1
    assert "this output cannot go to standard output" in one_error_line(capsys, "train")


def test_output_path_writes_a_regular_file_atomically(tmp_path):
    target = check_output_path(tmp_path / "x.bin", "--out")
    with output_path(target) as tmp:
        tmp.write_bytes(b"whole")
        assert not (tmp_path / "x.bin").exists()  # nothing at the path until the write is complete
    assert (tmp_path / "x.bin").read_bytes() == b"whole"


# --- --force and the TensorBoard folder ------------------------------------------------------------------------


def test_force_replaces_a_run_with_a_tensorboard_folder_of_event_files(run_copy, tmp_path):
    from conftest import TINY_MODEL, write_patterned_corpus

    import neurallm

    events = run_copy / runfolder.TENSORBOARD_DIR / "sub"
    events.mkdir(parents=True)
    (events / "events.out.tfevents.123.host.1.0").write_bytes(b"x")
    assert runfolder.foreign_entries(run_copy) == []
    corpus = write_patterned_corpus(tmp_path / "corpus", lines=40)
    neurallm.train(corpus, run_copy, force=True, progress=False, **TINY_MODEL)
    assert not (run_copy / runfolder.TENSORBOARD_DIR).exists()


@pytest.mark.parametrize("planted", ["notes.txt", "link"])
def test_force_refuses_a_tensorboard_folder_holding_anything_else(run_copy, capsys, planted):
    board = run_copy / runfolder.TENSORBOARD_DIR
    board.mkdir()
    if planted == "link":
        (board / "events.out.tfevents.1").symlink_to(run_copy / "config.json")
    else:
        (board / planted).write_text("mine")
    assert runfolder.foreign_entries(run_copy) == [runfolder.TENSORBOARD_DIR]
    assert main(["train", "--data", "x", "--out", str(run_copy), "--force"]) == 1
    assert "refusing to delete it even with --force" in one_error_line(capsys, "train")


def test_generate_out_dev_stdout_writes_through_to_the_pipe(trained_run):
    result = cli("generate", str(trained_run), "--tokens", "5", "--seed", "3", "--out", "/dev/stdout")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_export_onnx_dash_is_the_model_on_standard_output(trained_run, tmp_path):
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    result = cli("export", str(trained_run), "--onnx", "-")
    assert result.returncode == 0, result.stderr
    assert b"exported" in result.stderr and b"exported" not in result.stdout[-200:]
    (tmp_path / "m.onnx").write_bytes(result.stdout)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "ids"
