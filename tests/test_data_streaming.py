"""Text corpora are read from disk a block at a time (documents.FileDocument, split.Span): the
cache key, the split and the tokens must be exactly those of reading every file whole, which
existing caches and checkpoints record. The oracle is the whole-text implementation this
replaced, kept here: each file's text read whole, the texts split, each side's encoded whole."""

import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from dropless import data, documents, tokenizer
from dropless.tokenizer import BPETokenizer, ByteTokenizer, train_bpe

# bytes that stress the decoder at a read's end: multibyte characters, invalid and cut sequences
PARTS = [b"a", b"Z ", b"\n", b"\n\n", b" \n", b"x\n", b"\t", b"caf\xc3\xa9", b"\xe2\x98\x83",
         b"\xf0\x9f\x8e\x89", b"\xff", b"\xc3", b"\xe2\x98", b"\xf0\x9f\x8e", b"\xed\xa0\x80",
         b"\xc0\xaf", b"\x80\x80", b"\xf4\x90\x80\x80", b"def f(x):\n    return x\n"]


def _bytes(rng: random.Random, n: int) -> bytes:
    return b"".join(rng.choice(PARTS) for _ in range(n))


# ---- the oracle: the whole-text implementation (dropless before texts were streamed) ------------

def _old_key(docs, tok, cut_small_side: bool) -> str:
    h = hashlib.sha256(f"{data.CACHE_VERSION}|{data.VAL_PERCENT}|".encode())
    if cut_small_side:
        h.update(b"cut-small-side|")
    h.update(hashlib.sha256(tok.to_json().encode()).digest())
    for name, text in docs:
        h.update(hashlib.sha256(name.encode()).digest())
        h.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()[:32]


def _old_split(docs):
    val_of = [data._hash64(name) % 100 < data.VAL_PERCENT for name, _ in docs]
    train = [text for (_, text), v in zip(docs, val_of) if not v]
    val = [text for (_, text), v in zip(docs, val_of) if v]
    total = sum(map(len, train)) + sum(map(len, val))
    if (not train or not val or 200 * sum(map(len, val)) < total * data.VAL_PERCENT
            or 200 * sum(map(len, train)) < total * (100 - data.VAL_PERCENT)):
        text = data.DOC_SEPARATOR.join(text for _, text in docs)
        cut = len(text) * (100 - data.VAL_PERCENT) // 100
        return [text[:cut]], [text[cut:]], bool(train and val)
    return train, val, False


def _old_results(docs, tok):
    """(cache key, train.bin bytes, val.bin bytes) as the whole-text implementation made them."""
    train, val, cut_small_side = _old_split(docs)
    sep = tok.encode(data.DOC_SEPARATOR)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    sides = []
    for texts in (train, val):
        ids = [part for i, t in enumerate(texts) for part in ([sep] if i else []) + [tok.encode(t)]]
        sides.append(np.concatenate(ids or [np.zeros(0, np.int64)]).astype(dtype).tobytes())
    return _old_key(docs, tok, cut_small_side), *sides


def _whole_texts(root: Path, names: list[str]):
    return [(name, (root / name).read_bytes().decode("utf-8", errors="replace")) for name in names]


# ---- the corpora -----------------------------------------------------------------------------

def _directory(tmp_path: Path, seed: int, files: int, size: int) -> tuple[Path, list[str]]:
    """`files` files (in the folder and a sub-folder) of about `size` random parts; names in the
    order read_documents lists them."""
    rng = random.Random(seed)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    names = [f"f{i:03d}.txt" for i in range(files // 2)] + [f"sub/g{i:03d}.txt"
                                                           for i in range(files - files // 2)]
    for name in names:
        (root / name).write_bytes(_bytes(rng, rng.randint(0, 2 * size)))
    return root, names


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    rng = random.Random(0)
    return train_bpe([_bytes(rng, 300).decode("utf-8", errors="replace") for _ in range(20)], 400)


def _tokenizer(kind, bpe):
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return bpe
    from tokenizers import Tokenizer as HFTokenizer   # a normalizer: texts are tokenized whole
    spec = json.loads(bpe.tok.to_str())
    spec["normalizer"] = {"type": "Prepend", "prepend": "_"}
    return BPETokenizer(HFTokenizer.from_str(json.dumps(spec)))


def _check(path: Path, whole, tok, cache: Path) -> data.TokenData:
    """read_documents + load_tokens of `path` make the oracle's key and files, and hit after."""
    key, train, val = _old_results(whole, tok)
    docs = data.read_documents(str(path))
    assert data.cache_key(docs, tok) == key
    tokens = data.load_tokens(docs, tok, cache)
    assert tokens.key == key
    assert (cache / key / "train.bin").read_bytes() == train
    assert (cache / key / "val.bin").read_bytes() == val
    assert data.split_documents(docs) == _old_split(whole)[:2]
    return tokens


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["bytes", "bpe", "whole"])
def test_a_directory_split_by_name_is_cached_as_whole_texts(tmp_path, monkeypatch, bpe, kind,
                                                             seed):
    monkeypatch.setattr(documents, "READ_BYTES", 5 + seed)   # many reads cut a character
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 37)
    root, names = _directory(tmp_path, seed, 240, 30)
    whole = _whole_texts(root, names)
    assert not _old_split(whole)[2] and len(_old_split(whole)[1]) > 3   # split by name
    _check(root, whole, _tokenizer(kind, bpe), tmp_path / "cache")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["bytes", "bpe", "whole"])
def test_a_few_files_are_cut_by_position_across_them(tmp_path, monkeypatch, bpe, kind, seed):
    """The cut of the joined text lands inside a file (or a separator): its halves are ranges
    of it, read from disk."""
    monkeypatch.setattr(documents, "READ_BYTES", 3 + seed)
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 29)
    root, names = _directory(tmp_path, seed + 10, 6, 80)
    whole = _whole_texts(root, names)
    _check(root, whole, _tokenizer(kind, bpe), tmp_path / "cache")
    assert _old_split(whole)[0][0] == data.split_documents(data.read_documents(str(root)))[0][0]


def test_a_big_file_cut_at_the_real_read_size(tmp_path, bpe):
    """A ~2.3 MiB file, multibyte and invalid sequences straddling the 1 MiB reads: its length,
    text, key and tokens are those of one decode of its bytes."""
    rng = random.Random(5)
    step = documents.READ_BYTES
    raw = bytearray(_bytes(rng, 2 * step // 4 + 60_000))
    for at in (step, 2 * step):   # a cut sequence, an invalid byte, a 4-byte character
        for k, part in enumerate((b"\xf0\x9f\x8e\x89", b"\xe2\x98", b"\xff", b"\xc3\xa9")):
            raw[at - 2 - 6 * k:at - 2 - 6 * k + len(part)] = part
    path = tmp_path / "big.txt"
    path.write_bytes(bytes(raw))
    text = bytes(raw).decode("utf-8", errors="replace")
    doc, = data.read_documents(str(path))
    assert doc.chars == len(text) and doc.text == text and not doc.blank
    start, end = step - 100, 2 * step + 3
    assert "".join(doc.blocks(start, end)) == text[start:end]
    for tok in (ByteTokenizer(), bpe):
        _check(path, [("big.txt", text)], tok, tmp_path / "cache")


@pytest.mark.parametrize("seed", range(20))
def test_the_streaming_decode_is_one_decode_of_the_bytes(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    raw = _bytes(rng, rng.randint(0, 300)) + rng.randbytes(rng.randint(0, 40))
    monkeypatch.setattr(documents, "READ_BYTES", rng.randint(1, 9))
    (tmp_path / "t.txt").write_bytes(raw)
    doc = documents.FileDocument("t.txt", tmp_path / "t.txt", "--data")
    text = raw.decode("utf-8", errors="replace")
    assert doc.text == text and doc.chars == len(text)
    assert doc.digest == hashlib.sha256(text.encode()).digest()
    assert doc.blank == (not text.strip()) and doc.binary == ("\x00" in text)
    start = rng.randint(0, len(text))
    end = rng.randint(start, len(text))
    assert "".join(doc.blocks(start, end)) == text[start:end]


def test_the_stdlib_corpus_keeps_its_key():
    docs = documents.stdlib_documents()
    root = Path(sysconfig.get_paths()["stdlib"])
    whole = _whole_texts(root, [doc.name for doc in docs])
    assert docs[:3] == whole[:3]
    tok = ByteTokenizer()
    assert data.cache_key(docs, tok) == _old_key(whole, tok, False)


def test_a_file_changed_after_it_was_listed_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 100)
    docs = data.read_documents(str(tmp_path / "a.txt"))
    (tmp_path / "a.txt").write_text("other " * 101)
    with pytest.raises(data.DroplessError, match="a.txt: the file changed while the corpus"):
        data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache")


MEASURE = """
import resource, sys
from pathlib import Path
from dropless import data
from dropless.tokenizer import ByteTokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = data.load_tokens(data.read_documents(sys.argv[1]), ByteTokenizer(), Path(sys.argv[2]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, len(tokens.train))
"""


def test_a_big_file_is_never_held_whole(tmp_path):
    """A 120 MB file, cache miss then hit, each in its own process: the peak resident memory
    grows by far less than the file (whole, it grew ~3x on a miss and ~4.6x while read)."""
    size = 120 << 20
    line = "".join(f"line {i} of the corpus, caf\u00e9 \u2603\n" for i in range(1000)).encode()
    with open(tmp_path / "big.txt", "wb") as f:
        for _ in range(size // len(line)):
            f.write(line)
    env = {**os.environ, "PYTHONPATH": str(Path(data.__file__).parents[1])}
    for _ in ("miss", "hit"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "big.txt"),
                              str(tmp_path / "cache")], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        assert int(out[1]) > size * 0.9   # all of it tokenized
        assert int(out[0]) < size // 4, f"grew {int(out[0]) >> 20} MiB"
