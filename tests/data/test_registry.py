"""Tests of the dataset registry against a real HTTP server on 127.0.0.1 serving files built here."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from neurallm.data import registry
from neurallm.data.registry import DatasetSpec, RemoteFile, resolve_dataset
from neurallm.errors import DataError

SPLIT_TEXT = {
    "train": " = Valkyria = \n the game began in 2011 . \n",
    "valid": " = Homarus = \n lobsters are <unk> . \n",
    "test": " = Robert = \n he was born in 1900 . \n",
}
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


@dataclass
class Server:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)


class _CountingHandler(SimpleHTTPRequestHandler):
    def __init__(self, *args, requests: list[str], **kwargs) -> None:
        self._requests = requests
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._requests.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = partial(_CountingHandler, requests=requests, directory=str(root))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}", requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path/work so that ./data and ../shared/data cannot find the real corpora."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("NEURALLM_CACHE", str(tmp_path / "cache"))
    for var in ("NEURALLM_DATA", "NEURALLM_MIRROR", "XDG_CACHE_HOME", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return work


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def build_wikitext_zip(root: Path, members: dict[str, str] | None = None) -> Path:
    """A small zip shaped like wikitext-2-v1.zip."""
    members = members or {f"wikitext-2/wiki.{s}.tokens": text for s, text in SPLIT_TEXT.items()}
    path = root / "wikitext-2-v1.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def use_zip_spec(monkeypatch: pytest.MonkeyPatch, server: Server, md5: str) -> None:
    real = registry.DATASETS["wikitext-2"]
    spec = DatasetSpec(
        name="wikitext-2",
        description=real.description,
        level="word",
        files=(RemoteFile(real.files[0].url, md5),),
        archive=True,
        split_files=dict(real.split_files),
    )
    monkeypatch.setitem(registry.DATASETS, "wikitext-2", spec)
    monkeypatch.setenv("NEURALLM_MIRROR", server.url)


def use_text_spec(monkeypatch: pytest.MonkeyPatch, server: Server, md5: str) -> None:
    real = registry.DATASETS["tinyshakespeare"]
    spec = DatasetSpec("tinyshakespeare", real.description, "char", (RemoteFile(real.files[0].url, md5),), False,
                       {"all": "input.txt"})
    monkeypatch.setitem(registry.DATASETS, "tinyshakespeare", spec)
    monkeypatch.setenv("NEURALLM_MIRROR", server.url)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_zip_dataset_is_downloaded_verified_extracted_and_returned_as_a_folder(monkeypatch, server, tmp_path):
    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root)))

    folder = resolve_dataset("wikitext-2", progress=False)

    assert folder == tmp_path / "cache" / "datasets" / "wikitext-2"
    assert server.requests == ["/wikitext-2-v1.zip"]
    for split, relative in registry.DATASETS["wikitext-2"].split_files.items():
        assert (folder / relative).read_text() == SPLIT_TEXT[split]
    assert (folder / ".complete").is_file()
    assert not (folder / "wikitext-2-v1.zip").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["wikitext-2"]  # no staging leftovers


def test_single_text_file_dataset_is_downloaded_into_the_cache(monkeypatch, server):
    (server.root / "input.txt").write_text(SHAKESPEARE)
    use_text_spec(monkeypatch, server, md5_of(server.root / "input.txt"))

    folder = resolve_dataset("tinyshakespeare", progress=False)

    assert (folder / "input.txt").read_text() == SHAKESPEARE


def test_second_resolve_uses_the_cache_and_does_not_download_again(monkeypatch, server):
    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root)))

    first = resolve_dataset("wikitext-2", progress=False)
    second = resolve_dataset("wikitext-2", progress=False)
    offline = resolve_dataset("wikitext-2", download=False)

    assert first == second == offline
    assert len(server.requests) == 1


def test_wrong_checksum_raises_data_error_naming_the_url_and_leaves_no_file_in_the_cache(
    monkeypatch, server, tmp_path
):
    build_wikitext_zip(server.root)
    use_zip_spec(monkeypatch, server, "0" * 32)

    with pytest.raises(DataError) as err:
        resolve_dataset("wikitext-2", progress=False)

    message = assert_one_line(err)
    assert f"{server.url}/wikitext-2-v1.zip" in message
    assert "0" * 32 in message and md5_of(server.root / "wikitext-2-v1.zip") in message
    assert files_under(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "datasets" / "wikitext-2").exists()


def test_download_file_writes_atomically_and_removes_the_temp_file_on_a_bad_checksum(server, tmp_path):
    (server.root / "input.txt").write_text(SHAKESPEARE)
    dest = tmp_path / "out" / "input.txt"

    with pytest.raises(DataError):
        registry.download_file(f"{server.url}/input.txt", dest, "f" * 32, progress=False)
    assert files_under(tmp_path / "out") == []

    assert registry.download_file(f"{server.url}/input.txt", dest, md5_of(server.root / "input.txt")) == dest
    assert [p.name for p in files_under(tmp_path / "out")] == ["input.txt"]


def test_missing_file_on_the_server_raises_data_error_with_the_url_and_a_manual_download_hint(
    monkeypatch, server, tmp_path
):
    use_zip_spec(monkeypatch, server, "0" * 32)  # nothing built: the server answers 404

    with pytest.raises(DataError) as err:
        resolve_dataset("wikitext-2", progress=False)

    message = assert_one_line(err)
    assert f"{server.url}/wikitext-2-v1.zip" in message and "404" in message
    assert "wikitext-2/" in message and str(Path.cwd() / "data") in message
    assert files_under(tmp_path / "cache") == []


def test_server_that_is_down_raises_data_error(monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    use_zip_spec(monkeypatch, Server(tmp_path, f"http://127.0.0.1:{port}"), "0" * 32)

    with pytest.raises(DataError) as err:
        resolve_dataset("wikitext-2", progress=False)

    assert f"http://127.0.0.1:{port}/wikitext-2-v1.zip" in assert_one_line(err)
    assert files_under(tmp_path / "cache") == []


def test_download_disabled_without_a_local_or_cached_copy_raises_data_error(server, monkeypatch):
    use_zip_spec(monkeypatch, server, "0" * 32)

    with pytest.raises(DataError, match="wikitext-2"):
        resolve_dataset("wikitext-2", download=False)
    assert server.requests == []


def test_local_folder_in_neurallm_data_is_used_before_downloading(monkeypatch, server, tmp_path):
    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root)))
    local = tmp_path / "mydata" / "wikitext-2"
    local.mkdir(parents=True)
    (local / "valid.txt").write_text("hello\n")
    monkeypatch.setenv("NEURALLM_DATA", str(tmp_path / "mydata"))

    assert resolve_dataset("wikitext-2") == local
    assert server.requests == []


def test_search_order_is_neurallm_data_then_dot_data_then_shared_data(monkeypatch, tmp_path, isolated):
    env_dir, dot_data, shared = tmp_path / "env", isolated / "data", tmp_path / "shared" / "data"
    monkeypatch.setenv("NEURALLM_DATA", str(env_dir))
    assert registry.search_dirs() == [env_dir, dot_data, shared]

    assert registry.find_local("ptb") is None
    for folder in (shared, dot_data, env_dir):  # each new one shadows the ones after it
        (folder / "ptb").mkdir(parents=True)
        assert registry.find_local("ptb") == folder / "ptb"
        assert resolve_dataset("ptb", download=False) == folder / "ptb"


def test_unknown_name_raises_data_error_listing_the_known_names():
    with pytest.raises(DataError) as err:
        resolve_dataset("wikitext-3")

    message = assert_one_line(err)
    assert "wikitext-3" in message
    for name in registry.DATASETS:
        assert name in message
    assert not registry.is_registered("wikitext-3") and registry.is_registered("ptb")


def test_zip_member_escaping_the_dataset_folder_is_refused(monkeypatch, server, tmp_path):
    members = {"wikitext-2/wiki.train.tokens": "ok\n", "../evil.txt": "pwned\n"}
    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root, members)))

    with pytest.raises(DataError, match=re.escape("../evil.txt")):
        resolve_dataset("wikitext-2", progress=False)

    assert not list(tmp_path.rglob("evil.txt"))
    assert files_under(tmp_path / "cache") == []


def test_folder_without_the_complete_marker_is_not_treated_as_complete(monkeypatch, server, tmp_path):
    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root)))
    interrupted = tmp_path / "cache" / "datasets" / "wikitext-2"
    (interrupted / "wikitext-2").mkdir(parents=True)
    (interrupted / "wikitext-2" / "wiki.train.tokens").write_text("half a fi")

    with pytest.raises(DataError):
        resolve_dataset("wikitext-2", download=False)

    folder = resolve_dataset("wikitext-2", progress=False)
    assert folder == interrupted and (folder / ".complete").is_file()
    assert (folder / "wikitext-2" / "wiki.train.tokens").read_text() == SPLIT_TEXT["train"]
    assert len(server.requests) == 1


def test_cache_dir_follows_neurallm_cache_then_xdg_cache_home_then_home(monkeypatch, tmp_path):
    assert registry.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NEURALLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "neurallm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "neurallm"


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_registered_specs_have_https_urls_md5_checksums_and_consistent_fields(name):
    spec = registry.DATASETS[name]
    assert spec.name == name and spec.level in ("word", "char") and spec.description
    assert spec.files and (len(spec.files) == 1 or not spec.archive)
    for remote in spec.files:
        assert remote.url.startswith("https://")
        assert re.fullmatch(r"[0-9a-f]{32}", remote.md5)
    assert set(spec.split_files) in ({"train", "valid", "test"}, {"all"})


def test_tinyshakespeare_is_the_known_char_level_file():
    spec = registry.DATASETS["tinyshakespeare"]
    assert spec.files[0].md5 == "6fb458f1232090904fb40fe944165e91"
    assert spec.level == "char" and spec.split_files == {"all": "input.txt"}


def test_a_downloaded_zip_dataset_is_read_by_name_in_its_archive_layout(monkeypatch, server):
    """`--data wikitext-2` after a download: the splits lie at wikitext-2/wiki.*.tokens inside the cache folder."""
    from neurallm.data.sources import SourceSettings
    from neurallm.data.stream import prepare_corpus
    from neurallm.data.tokenizers import TokenizerSettings

    use_zip_spec(monkeypatch, server, md5_of(build_wikitext_zip(server.root)))
    prepared = prepare_corpus(SourceSettings("wikitext-2"), TokenizerSettings())
    for split, text in SPLIT_TEXT.items():
        expected = sum(len(line.split()) + 1 for line in text.splitlines())
        assert prepared.meta["splits"][split]["tokens"] == expected
    assert server.requests == ["/wikitext-2-v1.zip"]
