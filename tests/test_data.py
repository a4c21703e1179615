import hashlib
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from dropless import data, documents
from dropless.errors import DroplessError
from dropless.tokenizer import ByteTokenizer, tokenizer_from_json, train_bpe


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 16, seed=7, step=3)
    x2, y2 = data.get_batch(tokens, 4, 16, seed=7, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.dtype == torch.int64 and x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])                 # targets are inputs shifted by one
    for other in (dict(seed=7, step=4), dict(seed=8, step=3), dict(seed=7, step=3, micro=1)):
        assert not torch.equal(x, data.get_batch(tokens, 4, 16, **other)[0])


def test_batches_stay_inside_the_tokens():
    tokens = np.arange(18, dtype=np.uint16)    # exactly one window of 17 fits at start 0 and 1
    for step in range(50):
        x, y = data.get_batch(tokens, 3, 16, seed=0, step=step)
        assert int(y.max()) <= 17


def test_split_is_by_name_and_independent_of_order():
    docs = [(f"pkg/mod{i}.py", f"text {i}") for i in range(400)]
    train, val = data.split_documents(docs)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = data.split_documents(shuffled)
    assert set(val) == set(val2) and set(train) == set(train2)
    assert 0.02 < len(val) / len(docs) < 0.10
    assert not set(train) & set(val)


def test_single_document_is_split_by_position():
    train, val = data.split_documents([("only.txt", "x" * 1000)])
    assert len(train[0]) == 950 and len(val[0]) == 50


def test_stdlib_corpus_is_the_interpreters_own_source():
    docs = documents.stdlib_documents()
    names = [name for name, _ in docs]
    assert len(docs) > 500 and all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n for n in names)
    assert "argparse.py" in names


def test_token_cache_is_reused(tmp_path, monkeypatch):
    docs = [(f"d{i}.txt", f"document number {i}\n" * 20) for i in range(40)]
    first = data.load_tokens(docs, ByteTokenizer(), tmp_path)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    text = data.DOC_SEPARATOR.join(data.split_documents(docs)[0])
    assert bytes(np.asarray(first.train, dtype=np.uint8)) == text.encode()

    def no_tokenizing(self, texts):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(ByteTokenizer, "encode_batch", no_tokenizing)
    second = data.load_tokens(docs, ByteTokenizer(), tmp_path)
    assert second.key == first.key and np.array_equal(second.val, first.val)
    assert [p.name for p in tmp_path.iterdir()] == [first.key]   # no temp dirs left behind
    changed = data.cache_key(docs[:-1], ByteTokenizer())
    assert changed != first.key


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "hello", "id": 1}) + "\n\n" + json.dumps({"text": "bye"}) + "\n")
    assert [t for _, t in data.read_documents(str(path))] == ["hello", "bye"]
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DroplessError, match='line 2 has no "text"'):
        data.read_documents(str(path))



def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and NEL raw inside a string; CRLF ends
    are fine too."""
    text = "one\u2028two\u2029three\x85four"
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + '{"text": "b"}\r\n',
                    encoding="utf-8", newline="")
    assert data.read_documents(str(path)) == [("docs.jsonl:1", text), ("docs.jsonl:2", "b")]

def test_directory_skips_hidden_binary_and_special_files(tmp_path):
    """FIFOs would block the read forever and devices never end: skipped, with one warning."""
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / ".hidden").write_text("secret")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "sub" / "zero").symlink_to("/dev/zero")
    with pytest.warns(UserWarning, match="skipped 3 binary or non-regular files .*: blob.bin, "
                                         "pipe, sub/zero"):
        docs = data.read_documents(str(tmp_path))
    assert docs == [("a.txt", "alpha"), ("sub/b.md", "beta")]


@pytest.mark.parametrize("kind", ["fifo", "device link", "binary"])
def test_a_single_special_or_binary_file_is_refused(tmp_path, kind):
    path = tmp_path / "data.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device link":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(b"PK\x03\x04\x00\x00 an archive, not text")
    message = "a binary file" if kind == "binary" else "not a regular file"
    with pytest.raises(DroplessError, match=f"--data {path}: {message}"):
        data.read_documents(str(path))


def test_non_utf8_is_replaced_not_fatal(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert data.read_documents(str(tmp_path))[0][1] == "caf\ufffd"


def test_bpe_round_trip():
    texts = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 50
    tok = train_bpe(texts, 300)
    assert 256 < tok.vocab_size <= 300     # training stops early when no pair repeats
    for s in ["def add(a, b):\n    return a + b\n", "ünïcödé ✓ 🚀 \t\r\n", "never seen: zqxj"]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert b"".join(tok.token_bytes(int(i)) for i in ids) == s.encode()
    assert len(tok.encode(texts[0])) < len(texts[0].encode())       # it actually merges
    again = tokenizer_from_json(tok.to_json())
    assert np.array_equal(again.encode(texts[1]), tok.encode(texts[1]))
    assert isinstance(tokenizer_from_json(ByteTokenizer().to_json()), ByteTokenizer)


def test_bpe_vocab_must_exceed_the_byte_alphabet():
    with pytest.raises(DroplessError, match="--vocab 256"):
        train_bpe(["abc"], 256)


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([0, 1, 2, 3] * 5), 256) == pytest.approx(np.log(4))
    assert data.unigram_entropy(np.zeros(10, dtype=np.uint16), 256) == 0


def test_eval_batches_are_fixed_and_cover_the_split():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = data.eval_batches(tokens, 4, 16, 3)
    assert len(batches) == 3 and batches[0][0].shape == (4, 16)
    assert int(batches[0][0][0, 0]) == 0 and int(batches[-1][1][-1, -1]) == 999


def test_non_byte_level_tokenizer_decodes_through_tokenizers():
    """A run converted from Hugging Face may carry any tokenizer.json, not only byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["hello world hello there"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"],
                                                show_progress=False))
    wrapped = tokenizer_from_json(tok.to_str())
    ids = wrapped.encode("hello world")
    assert wrapped.decode(ids) == "hello world"
    assert b"".join(wrapped.token_bytes(int(i)) for i in ids).decode().replace(" ", "") == "helloworld"


def forge_ids(entry, split, ids):
    """{split}.bin holding `ids`, meta.json its dtype, length and checksum: an entry that someone
    else wrote, consistent with itself."""
    meta = json.loads((entry / "meta.json").read_text())
    (entry / f"{split}.bin").write_bytes(ids.tobytes())
    meta.update({"dtype": ids.dtype.name, f"{split}_tokens": len(ids),
                 f"{split}_sha256": hashlib.sha256(ids.tobytes()).hexdigest()})
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no meta.json", "meta without checksums",
                                    "int64 ids", "an id past the vocabulary", "symlink", "fifo"])
def test_damaged_cache_entry_is_rebuilt_never_used(tmp_path, damage):
    docs = [(f"d{i}.txt", f"document number {i}\n" * 20) for i in range(40)]
    first = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache")
    expected = np.array(first.train), np.array(first.val)
    entry = tmp_path / "cache" / first.key
    del first
    if damage == "int64 ids":   # unigram_entropy's bincount of 2**40 wanted 8 TiB
        forge_ids(entry, "val", np.array([7, 2**40, 7], dtype=np.int64))
        train = np.fromfile(entry / "train.bin", dtype=np.uint16).astype(np.int64)
        forge_ids(entry, "train", train)
    elif damage == "an id past the vocabulary":
        forge_ids(entry, "val", np.array([7, 300, 7], dtype=np.uint16))
    elif damage == "symlink":   # the same bytes, in a file anyone may have named
        (tmp_path / "elsewhere.bin").write_bytes((entry / "train.bin").read_bytes())
        (entry / "train.bin").unlink()
        (entry / "train.bin").symlink_to(tmp_path / "elsewhere.bin")
    elif damage == "fifo":   # its read blocked forever
        (entry / "train.bin").unlink()
        os.mkfifo(entry / "train.bin")
        default = signal.signal(signal.SIGALRM,
                                lambda *_: pytest.fail("the cache check blocked on a FIFO"))
        signal.alarm(10)
    elif damage == "flip":   # a tampered entry: constant tokens
        (entry / "train.bin").write_bytes(bytes(len((entry / "train.bin").read_bytes())))
    elif damage == "truncate":
        (entry / "val.bin").write_bytes((entry / "val.bin").read_bytes()[:-2])
    elif damage == "no meta.json":
        (entry / "meta.json").unlink()
    else:
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                     if "sha256" not in k}))
    try:
        with pytest.warns(UserWarning, match=f"{entry}: token cache entry .*; rebuilding it"):
            again = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache")
    finally:
        if damage == "fifo":
            signal.alarm(0)
            signal.signal(signal.SIGALRM, default)
    assert np.array_equal(again.train, expected[0]) and np.array_equal(again.val, expected[1])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [again.key]


def test_cache_dir_that_is_a_file(tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(DroplessError, match="--cache-dir .*cache is a file, not a directory"):
        data.load_tokens([("a", "text " * 50)], ByteTokenizer(), tmp_path / "cache")


def test_tokenizing_in_chunks_changes_no_token_and_counts_every_character(monkeypatch):
    from dropless import tokenizer

    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 20)
    texts = ["alpha beta gamma " * 9, "", "delta", "epsilon zeta " * 3, "x"]
    tok = train_bpe(texts * 3, 300)
    calls, counted = [], []

    class Bar:
        def update(self, n):
            counted.append(n)

    class Counting:
        def encode_batch(self, batch):
            calls.append(len(batch))
            return tok.encode_batch(batch)

    from dropless.tokenizer import encode_chunks
    got = [piece for chunk in encode_chunks(Counting(), texts, Bar()) for piece in chunk]
    assert [i for i, _ in got] == list(range(len(texts)))   # (not a BPETokenizer: texts whole)
    assert [list(ids) for _, ids in got] == [list(ids) for ids in tok.encode_batch(texts)]
    assert sum(calls) == len(texts) and len(calls) > 1   # a chunk at a time, each text once
    assert sum(counted) == sum(map(len, texts))
    assert list(encode_chunks(tok, [])) == []


def test_a_new_cache_entry_shows_a_bar_and_the_same_tokens(tmp_path, capsys, monkeypatch):
    from dropless import tokenizer

    monkeypatch.setattr(tokenizer, "BAR_DELAY_S", 0)   # at once, not after 2 s
    docs = [(f"d{i}.txt", f"document number {i}\n" * 20) for i in range(40)]
    quiet = data.load_tokens(docs, ByteTokenizer(), tmp_path / "a")
    assert "tokenize" not in capsys.readouterr().err
    shown = data.load_tokens(docs, ByteTokenizer(), tmp_path / "b", progress=True)
    assert "tokenize" in capsys.readouterr().err
    assert np.array_equal(quiet.train, shown.train) and np.array_equal(quiet.val, shown.val)
    data.load_tokens(docs, ByteTokenizer(), tmp_path / "b", progress=True)   # cached: no bar
    assert "tokenize" not in capsys.readouterr().err


@pytest.mark.parametrize("assistant_only", [False, True])
def test_the_cache_is_written_a_chunk_at_a_time_with_the_same_tokens(tmp_path, monkeypatch,
                                                                      assistant_only):
    """Chunks of 40 characters: separators and masks land where a whole-corpus pass puts them."""
    from dropless import tokenizer
    from dropless.conversations import Rendered

    docs = [(f"d{i}.txt", Rendered(f"<u>question {i}<a>answer {i}$", [(14, 26)])
             if assistant_only else f"document number {i}\n" * 3) for i in range(40)]
    whole = data.load_tokens(docs, ByteTokenizer(), tmp_path / "a", assistant_only=assistant_only)
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 40)
    calls = []
    encode_batch = ByteTokenizer.encode_batch
    monkeypatch.setattr(ByteTokenizer, "encode_batch",
                        lambda self, texts: calls.append(len(texts)) or encode_batch(self, texts))
    chunked = data.load_tokens(docs, ByteTokenizer(), tmp_path / "b",
                               assistant_only=assistant_only)
    assert len(calls) > 4
    for split in ("train", "val"):
        assert np.array_equal(getattr(whole, split), getattr(chunked, split))
        if assistant_only:
            mask = getattr(chunked, f"{split}_mask")
            assert np.array_equal(getattr(whole, f"{split}_mask"), mask)
            assert 0 < mask.sum() < len(mask)
    if not assistant_only:   # the oracle: the split's texts joined as split_documents says
        text = data.DOC_SEPARATOR.join(data.split_documents(docs)[0])
        assert bytes(np.asarray(chunked.train, dtype=np.uint8)) == text.encode()


def test_a_full_disk_names_the_token_cache_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import builtins

    from dropless import cli

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith(".bin") and "w" in mode else f
    monkeypatch.setattr(builtins, "open", full_open)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to tokenize\n" * 200)
    code = cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps",
                     "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert err == f"dropless: error: {tmp_path / 'cache'}: No space left on device\n"
    assert not list((tmp_path / "cache").iterdir())   # the half-built entry was removed
