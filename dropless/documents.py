"""Reading a corpus: `--data` (a text file, a directory of text files, a `.jsonl` of records) or
the default, this interpreter's standard-library `.py` files, as (name, text) documents.

A text file is a FileDocument: its text stays on disk and is read again, a block at a time, when
it is tokenized; what the data side needs before that (its length, the hash in the cache key) is
found in one streaming pass as it is listed. So a corpus is never held whole, nor is one large
file. A `.jsonl` renders its records: TextDocuments, in memory."""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from dropless.conversations import jsonl_documents
from dropless.errors import DroplessError

READ_BYTES = 1 << 20   # a file is read (decoded, hashed) this many bytes at a time
SLICE_CHARS = 1 << 20   # an in-memory text is hashed, and read in a range, this many at a time


def text_digest(text: str) -> bytes:
    """sha256 of the text's UTF-8 (a lone surrogate, from a .jsonl escape, as "?"), hashed a
    slice at a time: a large text is not copied whole."""
    digest = hashlib.sha256()
    for i in range(0, len(text), SLICE_CHARS):
        digest.update(text[i:i + SLICE_CHARS].encode("utf-8", errors="replace"))
    return digest.digest()


class TextDocument(NamedTuple):
    """An in-memory (name, text): a .jsonl record's, or one a caller passes as a plain tuple."""

    name: str
    text: str

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def digest(self) -> bytes:
        return text_digest(self.text)

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[str]:
        """Characters [start, end) of the text: the text itself when whole, else in slices."""
        end = len(self.text) if end is None else end
        if start == 0 and end == len(self.text):
            yield self.text
            return
        for i in range(start, end, SLICE_CHARS):
            yield self.text[i:min(i + SLICE_CHARS, end)]


def _decoded(f) -> Iterator[str]:
    """The text of binary file `f` as one decode of all its bytes would give it (invalid UTF-8 as
    U+FFFD; a few stdlib test files are not UTF-8), a read at a time: the incremental decoder
    holds back a sequence cut at a read's end until the next read completes or refutes it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while raw := f.read(READ_BYTES):
        if block := decoder.decode(raw):
            yield block
    if block := decoder.decode(b"", final=True):
        yield block


def _stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class FileDocument:
    """A text file of the corpus, named `name`, its text read from `path` only when asked for
    (`blocks`, `text`). Found in one streaming pass as it was listed (`scan`): its length in
    characters, `digest` (text_digest of its text), whether it holds a NUL (`binary`) or only
    whitespace (`blank`). It unpacks, and compares, as the (name, text) of an in-memory document,
    reading its text then."""

    __slots__ = ("name", "path", "chars", "digest", "binary", "blank", "_stamp")
    __hash__ = None

    def __init__(self, name: str, path: Path, shown: str):
        self.name, self.path = name, path
        digest, self.chars, self.binary, self.blank = hashlib.sha256(), 0, False, True
        for block in self._read(shown):
            self.chars += len(block)
            digest.update(block.encode())   # decoded text holds no surrogates: no errors
            self.binary = self.binary or "\x00" in block
            self.blank = self.blank and block.isspace()   # isspace: what str.strip() strips
        self.digest = digest.digest()

    def _read(self, shown: str | None = None) -> Iterator[str]:
        """The decoded text a block at a time; the first read (`shown`: the flag and value, for
        messages) records the file's identity, size and time; later ones refuse a changed file,
        whose text would not be the one the cache key hashed."""
        try:
            with open(self.path, "rb") as f:
                if shown is not None:
                    self._stamp = _stamp(os.fstat(f.fileno()))
                elif _stamp(os.fstat(f.fileno())) != self._stamp:
                    raise DroplessError(f"{self.path}: the file changed while the corpus was "
                                        "being prepared; run again")
                yield from _decoded(f)
        except OSError as e:
            raise DroplessError(f"{shown or 'the corpus'}: cannot read {self.path} "
                                f"({e.strerror or e})") from None

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[str]:
        """Characters [start, end) of the text, a read (READ_BYTES) at a time."""
        end = self.chars if end is None else end
        if start >= end:
            return
        at = 0
        for block in self._read():
            if start < at + len(block) and at < end:
                yield block[max(start - at, 0):end - at]
            at += len(block)
            if at >= end:
                return

    @property
    def text(self) -> str:
        return "".join(self.blocks())

    def __iter__(self) -> Iterator[str]:
        return iter((self.name, self.text))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return self.name if i == 0 else tuple(self)[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, (tuple, FileDocument)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FileDocument({self.name!r}, {str(self.path)!r}, chars={self.chars})"


Document = FileDocument | TextDocument


def as_document(doc) -> Document:
    """A FileDocument as it is, a (name, text) as a TextDocument."""
    return doc if isinstance(doc, (FileDocument, TextDocument)) else TextDocument(*doc)


def _regular(path: Path, shown: str) -> bool:
    """Whether `path` (links followed) is a regular file: FIFOs block, devices never end."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError as e:
        raise DroplessError(f"{shown}: cannot read {path} ({e.strerror or e})") from None


def _scan(path: Path, name: str, shown: str) -> FileDocument | None:
    """The FileDocument of `path`; None unless it is a regular file."""
    return FileDocument(name, path, shown) if _regular(path, shown) else None


def _read_text(path: Path, shown: str) -> str | None:
    """A .jsonl's text, whole (it is rendered in memory); None unless it is a regular file."""
    if not _regular(path, shown):
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DroplessError(f"{shown}: cannot read {path} ({e.strerror or e})") from None
    return raw.decode("utf-8", errors="replace")


def stdlib_documents() -> list[FileDocument]:
    """(relative path, text) of every `.py` file of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder, name)
            if (doc := _scan(path, path.relative_to(root).as_posix(), "--data <stdlib>")):
                docs.append(doc)
    return docs


def _walk(root: Path, shown: str) -> list[FileDocument]:
    docs, skipped = [], []
    for folder, dirs, files in os.walk(root):   # links to directories are not followed (loops)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        skipped += [Path(folder, d).relative_to(root).as_posix() + "/" for d in dirs
                    if Path(folder, d).is_symlink()]
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder, name)
            name = path.relative_to(root).as_posix()
            if (doc := _scan(path, name, shown)) is None or doc.binary:
                skipped.append(name)
            else:
                docs.append(doc)
    if skipped:
        warnings.warn(f"{shown}: skipped {len(skipped)} binary or non-regular files "
                      f"(FIFOs, devices, links to directories, ...): {', '.join(skipped[:5])}"
                      + (" ..." if len(skipped) > 5 else ""), stacklevel=3)
    return docs


def read_documents(data: str | None, flag: str = "--data", chat: tuple[str, dict] | None = None,
                   assistant_only: bool = False, why: str = "--assistant-only-loss",
                   progress: bool = False) -> list[Document]:
    """(name, text) documents from `--data`: a text file, a directory of text files
    (recursively; hidden files skipped silently, binary and non-regular ones with a warning), as
    FileDocuments whose text is read later; a `.jsonl` of records (conversations.jsonl_documents:
    conversations rendered by `chat`, (chat template, special tokens), default the plain one; with
    `assistant_only`, conversations.Rendered texts that know what the loss covers) as
    TextDocuments; or None for the stdlib. `flag`: the option the user named `data` with, and
    `why`: what asked for assistant turns, for the messages. `progress`: a bar while
    conversations render."""
    shown = f"{flag} {data}"
    if data is None:
        docs = stdlib_documents()
    else:
        path = Path(data)
        if not path.exists():
            raise DroplessError(f"{shown}: no such file or directory")
        if path.is_dir():
            docs = _walk(path, shown)
        elif path.suffix == ".jsonl":
            if (text := _read_text(path, shown)) is None:
                raise DroplessError(f"{shown}: not a regular file (a FIFO, device or socket)")
            docs = [TextDocument(*doc) for doc in
                    jsonl_documents(path.name, text, shown, chat, assistant_only, progress)]
        elif (doc := _scan(path, path.name, shown)) is None:
            raise DroplessError(f"{shown}: not a regular file (a FIFO, device or socket)")
        elif doc.binary:
            raise DroplessError(f"{shown}: a binary file (it holds NUL bytes), not text")
        else:
            docs = [doc]
    if all(doc.blank if isinstance(doc, FileDocument) else not doc.text.strip() for doc in docs):
        raise DroplessError(f"{shown}: no text found (empty)")
    if assistant_only and flag.endswith("--data") and not any(
            getattr(doc.text, "spans", ()) for doc in docs if isinstance(doc, TextDocument)):
        raise DroplessError(f"{shown}: {why} needs conversations with an "
                            'assistant turn or completions (.jsonl lines {"messages": [...]} or '
                            '{"prompt": ..., "completion": ...}); it has none')
    return docs
