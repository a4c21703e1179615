"""Temp paths beside what a command writes (dropless/files.py `temp_beside`): a process killed
mid-write leaves its temp behind, and the next write removes it, but never a temp that a process
still running (here or on another host sharing the file system) is filling. `new_dir`: a name
that no other process gets."""

import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dropless import data
from dropless.files import new_dir, temp_beside, write_atomic
from dropless.tokenizer import ByteTokenizer

HOST = socket.gethostname().replace("-", "_")


def ended_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_beside_removes_only_what_ended_processes_of_this_host_left(tmp_path):
    out = tmp_path / "run"
    dead = tmp_path / f"run.tmp-{HOST}-{ended_pid()}"
    dead.mkdir()
    (dead / "part").write_text("half written")
    dead_file = tmp_path / f"run.tmp-{HOST}-{ended_pid()}"
    dead_file.write_text("x")
    live = tmp_path / f"run.tmp-{HOST}-{os.getppid()}"   # our parent: running
    live.mkdir()
    other_host = tmp_path / f"run.tmp-{HOST}x-{ended_pid()}"   # a host sharing the disk
    other_host.mkdir()
    mine = tmp_path / f"run.tmp-{HOST}-{os.getpid()}"   # an earlier failed try of this process
    mine.mkdir()
    unrelated = tmp_path / f"runner.tmp-{HOST}-{ended_pid()}"
    unrelated.mkdir()
    tmp = temp_beside(out)
    assert tmp == mine and not tmp.exists()
    assert not dead.exists() and not dead_file.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_temp_beside_hidden_names_and_glob_characters(tmp_path):
    out = tmp_path / "q[1]"
    stale = tmp_path / f".q[1].tmp-{HOST}-{ended_pid()}"
    stale.mkdir()
    visible = tmp_path / f"q[1].tmp-{HOST}-{ended_pid()}"   # not the hidden family
    visible.mkdir()
    assert temp_beside(out, hidden=True).name == f".q[1].tmp-{HOST}-{os.getpid()}"
    assert not stale.exists() and visible.exists()


def test_write_atomic_clears_a_killed_writers_temp(tmp_path):
    path = tmp_path / "state.json"
    stale = tmp_path / f"state.json.tmp-{HOST}-{ended_pid()}"
    stale.write_bytes(b"{")
    write_atomic(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_token_cache_clears_a_killed_builders_temp(tmp_path):
    docs = [(f"doc{i}", f"document {i}: " + "hello world, " * 40) for i in range(20)]
    cache = tmp_path / "cache"
    first = data.load_tokens(docs, ByteTokenizer(), cache)
    (key,) = [p.name for p in cache.iterdir()]
    stale = cache / f"{key}.tmp-{HOST}-{ended_pid()}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 64)
    shutil.rmtree(cache / key)   # so that the next load builds the entry again
    again = data.load_tokens(docs, ByteTokenizer(), cache)
    assert [p.name for p in cache.iterdir()] == [key]
    assert (first.train == again.train).all()


def test_write_atomic_that_fails_at_the_rename_leaves_the_old_file_and_no_temp(tmp_path,
                                                                              monkeypatch):
    """The rename can fail too (a directory in the way, a read-only mount): the temp file it was
    to move stayed behind, full size, until the next write of that path."""
    path = tmp_path / "config.json"
    path.write_text("old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_atomic(path, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert path.read_text() == "old"


def test_new_dir_gives_processes_asking_at_once_their_own_directories(tmp_path):
    """train's default run directory, runs/<second>: eight asking in one second, with a file
    in the way of one name, get eight new, empty directories; the parent is created."""
    base = str(tmp_path / "runs" / "20260101-000000")
    os.makedirs(os.path.dirname(base))
    with open(f"{base}-3", "w") as f:   # a file, not a directory: skipped, left alone
        f.write("x")
    start = threading.Barrier(8)

    def ask(_):
        start.wait()
        return new_dir(base)

    with ThreadPoolExecutor(8) as pool:   # os.mkdir releases the GIL: they do race
        names = list(pool.map(ask, range(8)))
    assert sorted(names) == [base, *(f"{base}-{n}" for n in (2, 4, 5, 6, 7, 8, 9))]
    assert all(os.path.isdir(n) and not os.listdir(n) for n in names)
    assert open(f"{base}-3").read() == "x"
    assert new_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
