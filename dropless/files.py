"""Reading the small files of a directory someone else may have written (configs, manifests,
indexes, tokenizers): regular files only, of bounded size, so that a FIFO cannot hang a command
and a sparse terabyte-sized `config.json` cannot exhaust memory. Writing what a command outputs:
all of it or none of it, through a temp path beside it and a rename into place, so that a full
disk or a kill mid-write leaves the previous file whole; a directory likewise (`atomic_dir`)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from dropless.errors import DroplessError

MAX_SMALL_FILE = 256 * 2**20   # the largest Hub tokenizer.json files are ~35 MB


def resolves_inside(root: Path, path: Path) -> bool:
    """Whether `path` stays inside the directory `root` with symlinks resolved. The one exception
    is a Hugging Face hub cache snapshot, whose files are symlinks into the same repo's blobs/
    (`models--org--name/snapshots/<rev>/config.json -> ../../blobs/<hash>`)."""
    try:
        real, top = Path(path).resolve(), Path(root).resolve()
    except (OSError, RuntimeError):   # a symlink loop (RuntimeError before Python 3.13)
        return False
    blobs = top.parent.parent / "blobs" if top.parent.name == "snapshots" else top
    return real.is_relative_to(top) or real.is_relative_to(blobs)


def need_dir(path: str | Path, what: str = "run directory", hint: str = "") -> None:
    """Raise unless `path` is a directory: a file there is named as one ("a file, not a run
    directory"), not as missing; `hint` follows either."""
    if not os.path.isdir(path):
        found = f"a file, not a {what}" if os.path.exists(path) else f"no such {what}"
        raise DroplessError(f"{path}: {found}{hint}")


def new_dir(path: str) -> str:
    """Create the directory `path`, or else `path-2`, `path-3`, ..., the first name that is free;
    -> the name created. os.mkdir fails where the name exists, so two processes asking for the
    same `path` at once (train's default `runs/<second>`) never get the same directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    name, n = path, 1
    while True:
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            n += 1
            name = f"{path}-{n}"


def read_small_text(path: str | Path, within: Path | None = None) -> str:
    """The UTF-8 text of `path`; DroplessError when it is not a regular file or is over
    MAX_SMALL_FILE bytes (checked before reading), or, given the model directory `within`, when
    it resolves outside it (a symlink to any file the user can read, copied into the outputs of
    convert, quantize and train --init)."""
    path, limit = Path(path), MAX_SMALL_FILE
    if within is not None and not resolves_inside(within, path):
        raise DroplessError(f"{path}: a symlink out of the model directory {within} (to "
                            f"{os.path.realpath(path)}): not read")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise DroplessError(f"{path}: not a regular file (a FIFO, device or directory is "
                                "not read)")
        if info.st_size > limit:
            raise DroplessError(f"{path}: {info.st_size:,} bytes, over the {limit:,} a file of "
                                "this kind may have")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise DroplessError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:   # grew while being read
        raise DroplessError(f"{path}: over the {limit:,} bytes a file of this kind may have")
    return data.decode("utf-8", errors="strict")


def read_small_json(path: str | Path, within: Path | None = None):
    """`read_small_text` parsed as JSON; DroplessError, naming `path` once, when it is not."""
    try:
        return json.loads(read_small_text(path, within))
    except DroplessError:
        raise
    except (ValueError, RecursionError) as err:   # not UTF-8, not JSON, nested too deep
        raise DroplessError(f"{path} is not readable JSON: {err}") from None


def read_json_object(path: str | Path, within: Path | None = None) -> dict:
    """`read_small_json` of a file that must hold a JSON object (a config, a checkpoint state)."""
    data = read_small_json(path, within)
    if not isinstance(data, dict):
        raise DroplessError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | Iterable[bytes]) -> None:
    """Write `path` through an fsynced temp file and a rename: all of it or none of it. `data`:
    the bytes, or pieces of them, each written as it comes (a file too long to hold at once)."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.writelines([data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:   # a full disk, or the pieces' producer failing: no temp left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):   # name the file (write errors carry no filename)
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yields a temp directory beside `out` to fill; renamed to `out` when the block ends, removed
    when it raises (or is interrupted), so that a failed or killed write leaves no directory that
    looks like a whole one (a kill's leftover is a hidden temp that the next one removes). `out`
    must not exist or be an empty directory: the caller refuses anything else, with its message."""
    out = Path(os.path.abspath(out))   # `.` names the directory it is (the temp goes beside it)
    tmp = temp_beside(out, hidden=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()   # empty (checked by the caller): a rename cannot replace it otherwise
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def temp_beside(path: Path, hidden: bool = False) -> Path:
    """This process's temp path beside `path` (`[.]NAME.tmp-HOST-PID`), to fill and then rename
    into place, after removing the ones that processes of this host that have ended (killed mid-
    write) left behind; another host's (a shared file system) are left alone."""
    host, me = socket.gethostname().replace("-", "_"), os.getpid()
    base = f"{'.' * hidden}{path.name}.tmp-"
    for stale in path.parent.glob(f"{glob.escape(base)}*"):
        stale_host, _, pid = stale.name[len(base):].rpartition("-")
        if stale_host == host and pid.isdigit() and (int(pid) == me or not _running(int(pid))):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return path.with_name(f"{base}{host}-{me}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        pass
    return True
