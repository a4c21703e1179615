"""Reading a corpus: `--data` (a text file, a directory of text files, a `.jsonl` of records) or
the default, this interpreter's standard-library `.py` files, as (name, text) documents."""

from __future__ import annotations

import os
import stat
import sysconfig
import warnings
from pathlib import Path

from dropless.conversations import jsonl_documents
from dropless.errors import DroplessError


def _read_text(path: Path, shown: str) -> str | None:
    """None unless `path` (links followed) is a regular file: FIFOs block, devices never end."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return None
        raw = path.read_bytes()
    except OSError as e:
        raise DroplessError(f"{shown}: cannot read {path} ({e.strerror or e})") from None
    return raw.decode("utf-8", errors="replace")   # a few stdlib test files are not UTF-8


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, text) of every `.py` file of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, name)
            if (text := _read_text(path, "--data <stdlib>")) is not None:
                docs.append((path.relative_to(root).as_posix(), text))
    return docs


def _walk(root: Path, shown: str) -> list[tuple[str, str]]:
    docs, skipped = [], []
    for folder, dirs, files in os.walk(root):   # links to directories are not followed (loops)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        skipped += [Path(folder, d).relative_to(root).as_posix() + "/" for d in dirs
                    if Path(folder, d).is_symlink()]
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder, name)
            if (text := _read_text(path, shown)) is None or "\x00" in text:
                skipped.append(path.relative_to(root).as_posix())
            else:
                docs.append((path.relative_to(root).as_posix(), text))
    if skipped:
        warnings.warn(f"{shown}: skipped {len(skipped)} binary or non-regular files "
                      f"(FIFOs, devices, links to directories, ...): {', '.join(skipped[:5])}"
                      + (" ..." if len(skipped) > 5 else ""), stacklevel=3)
    return docs


def read_documents(data: str | None, flag: str = "--data", chat: tuple[str, dict] | None = None,
                   assistant_only: bool = False, why: str = "--assistant-only-loss",
                   progress: bool = False) -> list[tuple[str, str]]:
    """(name, text) pairs from `--data`: a text file, a directory of text files (recursively, hidden
    binary and non-regular files skipped), a `.jsonl` of records (conversations.jsonl_documents:
    conversations rendered by `chat`, (chat template, special tokens), default the plain one;
    with `assistant_only`, conversations.Rendered texts that know what the loss covers), or None
    for the stdlib. `flag`: the option the user named `data` with, and `why`: what asked for
    assistant turns, for the messages. `progress`: a bar while conversations render."""
    shown = f"{flag} {data}"
    if data is None:
        docs = stdlib_documents()
    else:
        path = Path(data)
        if not path.exists():
            raise DroplessError(f"{shown}: no such file or directory")
        if path.is_dir():
            docs = _walk(path, shown)
        elif (text := _read_text(path, shown)) is None:
            raise DroplessError(f"{shown}: not a regular file (a FIFO, device or socket)")
        elif path.suffix == ".jsonl":
            docs = jsonl_documents(path.name, text, shown, chat, assistant_only, progress)
        elif "\x00" in text:
            raise DroplessError(f"{shown}: a binary file (it holds NUL bytes), not text")
        else:
            docs = [(path.name, text)]
    if not any(text.strip() for _, text in docs):
        raise DroplessError(f"{shown}: no text found (empty)")
    if assistant_only and flag.endswith("--data") and not any(
            getattr(text, "spans", ()) for _, text in docs):
        raise DroplessError(f"{shown}: {why} needs conversations with an "
                            'assistant turn or completions (.jsonl lines {"messages": [...]} or '
                            '{"prompt": ..., "completion": ...}); it has none')
    return docs
