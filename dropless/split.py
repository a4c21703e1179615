"""The train/validation split of a corpus's documents (dropless/documents.py): by a hash of each
document's name, so it does not depend on file order, machine or seed; a corpus this leaves
lopsided is cut by position, in the documents' order. The sides are Spans, ranges of the
documents' text that a file's text is read into a block at a time, never whole."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from dropless.conversations import cut, pieces
from dropless.documents import Document, TextDocument, as_document

VAL_PERCENT = 5   # of the documents (by a hash of their names) that go to validation
DOC_SEPARATOR = "\n\n"


def hash64(text: str) -> int:
    """A 64-bit hash of `text`, the same on every machine and in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def split_by_name(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [doc for doc in docs if hash64(doc.name) % 100 >= VAL_PERCENT]
    val = [doc for doc in docs if hash64(doc.name) % 100 < VAL_PERCENT]
    return train, val


def cut_by_position(train: list[Document], val: list[Document]) -> bool:
    """Whether a side of the split by name has under half its share of the characters: a single
    file, a handful of documents, or a validation side of only tiny or empty files (which left a
    large corpus a few validation tokens)."""
    train_chars, val_chars = (sum(doc.chars for doc in side) for side in (train, val))
    total = train_chars + val_chars
    return (not train or not val or 200 * val_chars < total * VAL_PERCENT
            or 200 * train_chars < total * (100 - VAL_PERCENT))


_SEPARATOR = TextDocument("", DOC_SEPARATOR)


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of the documents' texts joined by DOC_SEPARATOR, never joined: it
    iterates over them a block at a time (files read from disk), as encode_chunks takes a text."""

    docs: tuple[Document, ...]
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[str]:
        at = 0
        for i, doc in enumerate(self.docs):
            for part in (_SEPARATOR, doc) if i else (doc,):
                if self.start < at + part.chars and at < self.end:
                    yield from part.blocks(max(self.start - at, 0), min(self.end - at, part.chars))
                at += part.chars
                if at >= self.end:
                    return

    def read(self, limit: int | None = None) -> str:
        """The span's text (its first `limit` characters), in memory: a whole document's own."""
        end = self.end if limit is None else min(self.end, self.start + limit)
        if len(self.docs) == 1 and (self.start, end) == (0, self.docs[0].chars):
            return self.docs[0].text   # a .jsonl's Rendered text keeps its spans
        return "".join(Span(self.docs, self.start, end))


def _whole(doc: Document) -> Span:
    return Span((doc,), 0, doc.chars)


def split_spans(docs, val_docs=None) -> tuple[list[Span], list[Span]]:
    """split_documents' split as Spans of the documents: nothing read, nothing copied."""
    docs = [as_document(doc) for doc in docs]
    if val_docs is not None:
        return [_whole(doc) for doc in docs], [_whole(as_document(doc)) for doc in val_docs]
    train, val = split_by_name(docs)
    if not cut_by_position(train, val):
        return [_whole(doc) for doc in train], [_whole(doc) for doc in val]
    total = sum(doc.chars for doc in docs) + len(DOC_SEPARATOR) * max(len(docs) - 1, 0)
    cut = total * (100 - VAL_PERCENT) // 100
    return [Span(tuple(docs), 0, cut)], [Span(tuple(docs), cut, total)]


def split_documents(docs, val_docs=None) -> tuple[list[str], list[str]]:
    """-> (train texts, validation texts) of (name, text) documents. Given `val_docs`
    (--val-data), all of `docs` trains and they validate. Else by document name; when that leaves
    a side under half its share of the text (see cut_by_position) the concatenated text, in the
    documents' order, is cut at (100 - VAL_PERCENT)%. In memory: the cache is built from
    split_spans', the same split read a block at a time."""
    return tuple([span.read() for span in side] for side in split_spans(docs, val_docs))


def split_pieces(docs, val_docs=None) -> tuple[list, list]:
    """split_documents' split as conversations.pieces (text, in the loss): --assistant-only-loss.
    Rendered conversations are in memory anyway; other texts are read whole."""
    docs = [as_document(doc) for doc in docs]
    if val_docs is None and cut_by_position(*split_by_name(docs)):
        every = pieces([doc.text for doc in docs], DOC_SEPARATOR)
        return cut(every, sum(len(text) for text, _ in every) * (100 - VAL_PERCENT) // 100)
    train, val = split_documents(docs, val_docs)
    return pieces(train, DOC_SEPARATOR), pieces(val, DOC_SEPARATOR)
