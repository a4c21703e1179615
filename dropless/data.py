"""Memory-mapped token cache and deterministic batches of a corpus (read by dropless/documents.py,
split into train and validation by dropless/split.py).

Legend: B batch, T sequence length.

The default corpus is embedded in every Python install: the interpreter's own standard-library `.py`
files (site-packages excluded), so training never downloads anything. Documents go to validation by a
hash of their name, so the split does not depend on file order, machine or seed (a corpus this leaves
lopsided is cut by position, in the documents' sorted order). A batch is a pure
function of (seed, step, micro-batch): a resumed run sees exactly the batches an uninterrupted one
would, and the only data state a checkpoint needs is the cache key that proves the tokens match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropless import tokenizer as tokenizer_module
from dropless.conversations import IGNORE, encode_stream
from dropless.documents import as_document, read_documents
from dropless.errors import DroplessError
from dropless.files import read_small_json, temp_beside, write_atomic
from dropless.split import (DOC_SEPARATOR, VAL_PERCENT, cut_by_position, hash64 as _hash64,
                            split_by_name, split_documents, split_pieces, split_spans)
from dropless.tokenizer import Tokenizer, encode_chunks

CACHE_VERSION = "1"

# the split's names are re-exported: callers and tests split and read with dropless.data
__all__ = ["BPE_SAMPLE_CHARS", "CACHE_VERSION", "DOC_SEPARATOR", "VAL_PERCENT", "TokenData",
           "cache_key", "check_length", "default_cache_dir", "eval_batches", "get_batch",
           "load_tokens", "prepare", "read_documents", "split_documents", "unigram_entropy",
           "windows"]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dropless" / "tokens"


# ---- token cache ---------------------------------------------------------------------------------

@dataclass
class TokenData:
    train: np.ndarray     # memory-mapped token ids
    val: np.ndarray
    key: str              # hash of (documents, tokenizer, split): checkpoints record it
    # --assistant-only-loss: 1 where the loss covers the token (as a target), else None
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None


def cache_key(docs: list, tokenizer: Tokenizer, val_docs: list | None = None,
              assistant_only: bool = False) -> str:
    """The key of the documents' (read_documents' or (name, text)) cache entry: a FileDocument's
    text hashed as it was listed, so a cache hit reads no text again."""
    docs = [as_document(doc) for doc in docs]
    h = hashlib.sha256(f"{CACHE_VERSION}|{VAL_PERCENT}|".encode())
    if assistant_only:   # the same texts, other tokens (a piece at a time) and a mask
        h.update(b"assistant-only|")
    # a corpus cut by position only since the cut took tiny sides too (before, only an empty one)
    # has other tokens than its cache entries and checkpoints hold: a new key; the rest keep theirs
    train, val = split_by_name(docs)
    if val_docs is None and train and val and cut_by_position(train, val):
        h.update(b"cut-small-side|")
    h.update(hashlib.sha256(tokenizer.to_json().encode()).digest())
    held_out = [] if val_docs is None else [("", "--val-data:"), *val_docs]
    for doc in docs + [as_document(doc) for doc in held_out]:
        h.update(hashlib.sha256(doc.name.encode()).digest())
        h.update(doc.digest)
    return h.hexdigest()[:32]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _check_entry(entry: Path, vocab_size: int) -> str | None:
    """What is wrong with a cache entry of a tokenizer of `vocab_size` ids (None: intact).
    meta.json holds each file's sha256; the files are hashed as they are read, never held whole.
    The ids must be of the dtype _build writes and below `vocab_size`: an entry someone else
    wrote could otherwise name int64 ids of 2**40, and unigram_entropy count 8 TiB of them."""
    try:
        meta = read_small_json(entry / "meta.json")
        if meta["dtype"] != (dtype := _token_dtype(vocab_size)).name:
            return f"holds {meta['dtype']!r} ids, not {dtype.name!r}"
        for split in ("train", "val"):
            tokens = meta[f"{split}_tokens"]
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
                return f"names {split}_tokens={tokens!r}, not a count"
            files = [("bin", "", dtype)]
            if f"{split}_mask_sha256" in meta:   # a byte a token
                files.append(("mask", "_mask", np.dtype(np.uint8)))
            for kind, key, of in files:
                problem = _check_file(entry / f"{split}.{kind}", meta[f"{split}{key}_sha256"],
                                      tokens, of, vocab_size if kind == "bin" else None)
                if problem:
                    return f"{split}.{kind} {problem}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


READ_CHUNK = 1 << 22   # bytes hashed (and scanned for the largest id) at a time: whole ids


def _check_file(path: Path, sha256: str, length: int, dtype: np.dtype,
                vocab_size: int | None) -> str | None:
    """What is wrong with one file of a cache entry: not a regular file (a symlink names a file
    anyone chose; a FIFO's read never ends: opened without following links or blocking), not
    `length` items of `dtype`, not of the `sha256` recorded, or holding an id >= `vocab_size`."""
    if path.is_symlink():
        return "is a symbolic link"
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_size != length * dtype.itemsize:
            return "has the wrong length"
        digest, top = hashlib.sha256(), -1
        while chunk := f.read(READ_CHUNK):   # whole items: the length is checked above
            digest.update(chunk)
            if vocab_size is not None:
                top = max(top, int(np.frombuffer(chunk, dtype).max()))
    if digest.hexdigest() != sha256:
        return "fails its checksum"
    if vocab_size is not None and top >= vocab_size:
        return f"holds token id {top}, past the tokenizer's {vocab_size}"
    return None


def _build(folder: Path, docs, tokenizer: Tokenizer, val_docs=None,
           assistant_only: bool = False, progress: bool = False) -> None:
    dtype = _token_dtype(tokenizer.vocab_size)
    meta = {"dtype": dtype.name}
    sep = tokenizer.encode(DOC_SEPARATOR)   # between documents, as split_documents joins them
    splits = (split_pieces if assistant_only else split_spans)(docs, val_docs)
    chars = sum(len(p[0] if assistant_only else p) for texts in splits for p in texts)
    bar = tokenizer_module.delayed_bar(total=chars, desc="tokenize", unit="char", unit_scale=True,
                                       disable=not progress)
    for split, texts in zip(("train", "val"), splits):
        chunks = (encode_stream(tokenizer, texts, bar) if assistant_only
                  else _joined(encode_chunks(tokenizer, texts, bar), sep))
        _write_split(folder, split, chunks, dtype, meta, assistant_only)
    write_atomic(folder / "meta.json", json.dumps(meta).encode())
    bar.close()


def _joined(chunks, sep: np.ndarray):
    """(ids, None) per chunk of encode_chunks' (document, ids), `sep` between documents (across
    chunks too), none between the pieces of one."""
    last = None
    for chunk in chunks:
        parts = []
        for doc, ids in chunk:
            parts += [ids] if last in (None, doc) else [sep, ids]
            last = doc
        yield np.concatenate(parts), None


def _write_split(folder: Path, split: str, chunks, dtype, meta: dict, masked: bool) -> None:
    """{split}.bin (and {split}.mask, a byte a token) written a chunk of (ids, mask) at a time,
    their lengths and sha256 into meta: the ids are never all in memory at once. The files need
    no atomic write of their own: `folder` is a temp dir renamed into place whole."""
    tokens, sums = 0, {"bin": hashlib.sha256(), "mask": hashlib.sha256()}
    try:
        with contextlib.ExitStack() as files:
            out = {kind: files.enter_context(open(folder / f"{split}.{kind}", "wb"))
                   for kind in (("bin", "mask") if masked else ("bin",))}
            for ids, mask in chunks:
                tokens += len(ids)
                for kind, data in (("bin", ids.astype(dtype)), ("mask", mask)):
                    if kind in out:
                        raw = data.tobytes()
                        out[kind].write(raw)
                        sums[kind].update(raw)
            for f in out.values():
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:   # a full disk: these writes carry no file name: the cache's then
        raise OSError(e.errno, e.strerror, e.filename or str(folder.parent)) from None
    meta[f"{split}_tokens"] = tokens
    meta[f"{split}_sha256"] = sums["bin"].hexdigest()
    if masked:
        meta[f"{split}_mask_sha256"] = sums["mask"].hexdigest()


def load_tokens(docs: list, tokenizer: Tokenizer, cache_dir: Path, val_docs: list | None = None,
                assistant_only: bool = False, progress: bool = False) -> TokenData:
    """Token ids of both splits (split_documents') of the documents (read_documents', or (name,
    text) pairs) as read-only memmaps, tokenized once per (documents, validation documents,
    tokenizer) and reused from `cache_dir/<key>/` afterwards.
    The entry is built in a temp dir and renamed into place, so an interrupted build is never
    mistaken for a complete one; an entry that fails its checksums (damaged, tampered with) is
    rebuilt, never trained on. `progress`: a bar while a new entry is tokenized."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DroplessError(f"--cache-dir {cache_dir} is a file, not a directory")
    key = cache_key(docs, tokenizer, val_docs, assistant_only)
    entry = cache_dir / key
    if entry.exists() and (problem := _check_entry(entry, tokenizer.vocab_size)):
        warnings.warn(f"{entry}: token cache entry {problem}; rebuilding it", stacklevel=2)
        shutil.rmtree(entry)
    if not entry.exists():
        tmp = temp_beside(entry)
        tmp.mkdir(parents=True)
        try:
            _build(tmp, docs, tokenizer, val_docs, assistant_only, progress)
            with contextlib.suppress(OSError):   # another process finished the same entry first
                os.replace(tmp, entry)
        finally:   # a failed build (a full disk) leaves nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
        if problem := _check_entry(entry, tokenizer.vocab_size):
            raise DroplessError(f"{entry}: token cache entry cannot be built ({problem})")
    meta = read_small_json(entry / "meta.json")
    train, val = (np.memmap(entry / f"{split}.bin", dtype=meta["dtype"], mode="r",
                            shape=(meta[f"{split}_tokens"],)) for split in ("train", "val"))
    masks = [np.memmap(entry / f"{split}.mask", dtype=np.uint8, mode="r",
                       shape=(meta[f"{split}_tokens"],)) if assistant_only else None
             for split in ("train", "val")]
    return TokenData(train, val, key, *masks)


# ---- batches -------------------------------------------------------------------------------------

def windows(tokens: np.ndarray, starts: list[int], seq_len: int, mask=None):
    """(inputs, targets) int64 [len(starts), seq_len] of the windows at `starts`; targets where
    `mask` is 0 are IGNORE."""
    w_BT = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    x_BT, y_BT = w_BT[:, :-1], w_BT[:, 1:]
    if mask is not None:   # targets outside the loss: IGNORE
        m_BT = torch.from_numpy(np.stack([mask[s + 1:s + seq_len + 1] for s in starts]))
        y_BT = y_BT.masked_fill(m_BT == 0, IGNORE)
    return x_BT, y_BT


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int, step: int,
              micro: int = 0, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [B, T]: random windows chosen only by (seed, step, micro); targets
    where `mask` (TokenData's) is 0 are IGNORE."""
    gen = torch.Generator().manual_seed(_hash64(f"dropless-batch|{seed}|{step}|{micro}") >> 1)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=gen)
    return windows(tokens, starts.tolist(), seq_len, mask)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int,
                 mask: np.ndarray | None = None):
    """A fixed list of (inputs, targets) windows spread evenly over `tokens` (the same for every
    seed and step, so validation losses are comparable across runs); `mask` as get_batch's."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size * num_batches).astype(np.int64)
    return [windows(tokens, starts[i:i + batch_size].tolist(), seq_len, mask)
            for i in range(0, len(starts), batch_size)]


def check_length(data: TokenData, seq_len: int) -> None:
    for split, tokens, mask in (("training", data.train, data.train_mask),
                                ("validation", data.val, data.val_mask)):
        if len(tokens) < seq_len + 2:
            raise DroplessError(f"the {split} split has only {len(tokens)} tokens, too few for "
                                f"--seq-len {seq_len}: use more data or a shorter --seq-len")
        if mask is not None and not mask[1:].any():
            raise DroplessError(f"the {split} split has no assistant tokens for "
                                "--assistant-only-loss to train or validate on: use more "
                                "conversations (or --val-data)")


def unigram_entropy(tokens: np.ndarray, vocab_size: int, mask: np.ndarray | None = None) -> float:
    """Entropy in nats/token of the tokens' own unigram distribution (those the loss covers, where
    `mask`): the loss of the best model that ignores context, the baseline a language model has
    to beat."""
    tokens = np.asarray(tokens) if mask is None else np.asarray(tokens)[np.asarray(mask) != 0]
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# BPE merges are learned from the first 16 M characters of training text
BPE_SAMPLE_CHARS = 16_000_000


def _bpe_sample(docs, val_docs) -> list[str]:
    """The first BPE_SAMPLE_CHARS characters of the training texts, the last text cut where the
    sample ends (one large file is not learned from whole, nor read past the sample)."""
    sample, left = [], BPE_SAMPLE_CHARS
    for span in split_spans(docs, val_docs)[0]:
        if left <= 0:
            break
        sample.append(span.read(left))
        left -= len(span)
    return sample


def prepare(cfg, state: dict | None, source=None, progress: bool = False):
    """-> (tokenizer, TokenData) of a run (a TrainConfig): a resumed run's saved tokenizer, an
    --init run's source's (dropless.finetune), else bytes or BPE learned on the training text;
    the tokens cached, long enough for seq_len, and a resumed run's the same as before."""
    from dropless.serve.text import chat_files
    from dropless.tokenizer import ByteTokenizer, tokenizer_from_json, train_bpe

    # conversations render in the --init source's chat template (a resumed run: the copy in its
    # directory), else the plain default
    chat = source.chat[1:] if source is not None else chat_files(Path(cfg.out))
    only = cfg.assistant_only_loss
    docs = read_documents(cfg.data, "--data" if state is None else "the run's --data", chat, only,
                          progress=progress)
    val_docs = None if cfg.val_data is None else read_documents(
        cfg.val_data, "--val-data" if state is None else "the run's --val-data", chat, only,
        progress=progress)
    if state is not None:
        tok = tokenizer_from_json(state["tokenizer"])
    elif source is not None:
        tok = source.tokenizer
    elif cfg.tokenizer == "bpe":
        tok = train_bpe(_bpe_sample(docs, val_docs), cfg.vocab)
        if tok.vocab_size < cfg.vocab:   # the text has fewer merges: the model's vocab follows
            warnings.warn(f"--vocab {cfg.vocab}: the training text yields only {tok.vocab_size} "
                          f"BPE tokens, the model's vocabulary size (more text makes more)",
                          stacklevel=2)
    else:
        tok = ByteTokenizer()
    tokens = load_tokens(docs, tok, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(),
                         val_docs, only, progress)
    check_length(tokens, cfg.seq_len)
    if state is not None and state["data"]["key"] != tokens.key:
        raise DroplessError("config mismatch on resume: the data (or its tokenization) changed "
                            "since the checkpoint was written")
    return tok, tokens
