"""A large text is tokenized a piece at a time (tokenizer.text_pieces), with the same ids as
whole: a corpus of one big file took ~23x its size in memory (the int64 ids of the whole text,
then their concatenation with the separators)."""

import json
import random

import numpy as np
import pytest

from dropless import data, tokenizer
from dropless.tokenizer import (BPETokenizer, ByteTokenizer, encode_chunks, text_pieces,
                                train_bpe)

ALPHABET = ["a", "b", "Z", "7", " ", "  ", "\n", "\n\n", "\r\n", "\t", ".", "'s", "é", "☃", "🎉",
            "<|x|>", " \n", "\n ", "0.5", "don't", "\u00a0", "\u2028", "\x1c"]


def _texts(seed: int, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 400))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(_texts(0) * 4, 400)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_pieces_tokenize_as_the_whole_text(monkeypatch, bpe, kind, seed):
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 7)
    tok = ByteTokenizer() if kind == "bytes" else bpe
    assert tok.cuts == ("anywhere" if kind == "bytes" else "lines")
    cut = 0
    for text in _texts(seed + 1):
        pieces = list(text_pieces(tok, text))
        assert "".join(pieces) == text
        cut += len(pieces) > 1
        whole = tok.encode(text).tolist()
        assert [t for p in pieces for t in tok.encode(p).tolist()] == whole, pieces
        got = [(i, ids) for chunk in encode_chunks(tok, [text, "x"]) for i, ids in chunk]
        assert [t for i, ids in got if i == 0 for t in ids.tolist()] == whole
    assert cut >= 20   # most texts were cut


def test_pieces_cut_where_the_tokenizer_allows(monkeypatch, bpe):
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 4)
    assert list(text_pieces(ByteTokenizer(), "abcdefghij")) == ["abcd", "efgh", "ij"]
    # before a newline that follows a non-space, at least a chunk's characters on
    assert list(text_pieces(bpe, "ab\ncdef \ngh\n\nij\nk")) == ["ab\ncdef \ngh", "\n\nij", "\nk"]
    assert list(text_pieces(bpe, "abcdefgh ijkl")) == ["abcdefgh ijkl"]   # no newline: whole


def _with(spec_change) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    spec = json.loads(train_bpe(_texts(0), 300).tok.to_str())
    spec_change(spec)
    return BPETokenizer(HFTokenizer.from_str(json.dumps(spec)))


@pytest.mark.parametrize("change", [
    lambda s: s.update(normalizer={"type": "Prepend", "prepend": "_"}),
    lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
    lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                      "prepend_scheme": "always", "split": True}),
    lambda s: s.update(post_processor={"type": "TemplateProcessing",
                                       "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                                  {"SpecialToken": {"id": "a", "type_id": 0}}],
                                       "pair": [], "special_tokens": {"a": {
                                           "id": "a", "ids": [97], "tokens": ["a"]}}}),
    lambda s: s["added_tokens"].append({"id": 300, "content": "x\ny", "single_word": False,
                                        "lstrip": False, "rstrip": False, "normalized": False,
                                        "special": True}),
])
def test_other_tokenizers_take_a_text_whole(monkeypatch, change):
    """A normalizer, a prefix, another pre-tokenizer, tokens added around each text or an added
    token holding a newline could change the ids at a cut: such a text is tokenized whole."""
    tok = _with(change)
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 4)
    assert tok.cuts is None
    assert list(text_pieces(tok, "ab\ncdef\ngh\n")) == ["ab\ncdef\ngh\n"]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_a_cache_built_in_pieces_holds_the_whole_texts_ids(tmp_path, monkeypatch, bpe, kind):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    docs = [(f"d{i}", text) for i, text in enumerate(_texts(9, 12))] + [("one", "\n".join(
        _texts(10, 30)))]
    whole = data.load_tokens(docs, tok, tmp_path / "whole")
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 16)
    pieces = data.load_tokens(docs, tok, tmp_path / "pieces")
    assert whole.key == pieces.key
    assert np.array_equal(whole.train, pieces.train) and np.array_equal(whole.val, pieces.val)
    sep = tok.encode(data.DOC_SEPARATOR).tolist()
    train, val = data.split_documents(docs)
    want = []
    for text in train:
        want += (sep if want else []) + tok.encode(text).tolist()
    assert pieces.train.tolist() == want


def test_bpe_learns_from_the_first_sample_chars_of_one_big_file(small_cfg, tmp_path, monkeypatch):
    """The sample ends inside a document: one large file is not learned from whole (merges
    from a 95 MB file took ~7 GB and minutes)."""
    from dropless import data as data_module
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i} of the one file\n" for i in range(4000)))
    learned = []
    real = tokenizer.train_bpe
    monkeypatch.setattr(tokenizer, "train_bpe", lambda texts, vocab: learned.append(texts) or
                        real(texts, vocab))
    monkeypatch.setattr(data_module, "BPE_SAMPLE_CHARS", 1000)
    tok, tokens = data_module.prepare(small_cfg(data=str(big), tokenizer="bpe", vocab=300), None)
    train = data_module.split_documents(data_module.read_documents(str(big)))[0]
    assert learned == [[train[0][:1000]]]
    assert len(tokens.train) > 10_000   # and all of it tokenized


def test_assistant_only_pieces_keep_their_runs_flags(monkeypatch, bpe):
    """encode_stream (--assistant-only-loss): a long run of text cut into pieces keeps its flag
    on every token, and the ids are the runs' own."""
    from dropless.conversations import encode_stream
    runs = [(text, i % 2 == 1) for i, text in enumerate(_texts(11, 8))]
    merged = []   # encode_stream's runs: texts of one flag in a row are one text
    for text, flag in runs:
        if merged and merged[-1][1] == flag:
            merged[-1][0] += text
        elif text:
            merged.append([text, flag])
    whole = [(bpe.encode(t).tolist(), flag) for t, flag in merged]
    monkeypatch.setattr(tokenizer, "ENCODE_CHUNK_CHARS", 9)
    chunks = list(encode_stream(bpe, runs))
    assert len(chunks) > len(whole)   # cut into more chunks than there are runs
    ids = np.concatenate([i for i, _ in chunks]).tolist()
    flags = np.concatenate([m for _, m in chunks]).tolist()
    assert ids == [t for run, _ in whole for t in run]
    assert flags == [int(flag) for run, flag in whole for _ in run]
