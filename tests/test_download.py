"""Fetching PTB: the word files from a URL (a local server here), MD5-checked, char files derived byte-exact."""

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from charlm import ptb
from charlm.errors import CharlmError


@pytest.fixture
def serve(tmp_path):
    """Serve a directory on 127.0.0.1; yields a function dir -> URL template."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        handler.log_message = lambda *a: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/ptb.{{split}}.txt"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()  # its listening socket


def test_download_checks_md5_and_derives_char_files(real_data, tmp_path, serve):
    remote = tmp_path / "remote"
    remote.mkdir()
    for split in ptb.SPLITS:
        shutil.copy(real_data / f"ptb.{split}.txt", remote)
    target = tmp_path / "data"
    ptb.ensure_files(target, "char", serve(remote))
    for split in ptb.SPLITS:
        for name in (f"ptb.{split}.txt", f"ptb.char.{split}.txt"):
            assert ptb.md5sum(target / name) == ptb.MD5[name]
    assert not list(target.glob(".*part"))


def test_wrong_checksum_fails_clearly_and_leaves_nothing(tmp_path, serve):
    remote = tmp_path / "remote"
    remote.mkdir()
    for split in ptb.SPLITS:
        (remote / f"ptb.{split}.txt").write_text(" not the treebank \n")
    target = tmp_path / "data"
    with pytest.raises(CharlmError) as err:
        ptb.ensure_files(target, "char", serve(remote))
    message = str(err.value)
    assert "ptb.train.txt" in message and ptb.MD5["ptb.train.txt"] in message and "by hand" in message
    assert "\n" not in message
    assert list(target.iterdir()) == []


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(CharlmError, match="could not download ptb.train.txt"):
        ptb.ensure_files(tmp_path / "data", "char", "http://127.0.0.1:9/ptb.{split}.txt")
