"""Adversarial cases for the data side: corpus files, token cache, tokenizers, run logs."""

import hashlib
import json

import pytest

from conftest import run_out_of_space
from dropless import data
from dropless.errors import DroplessError
from dropless.files import read_small_json
from dropless.tokenizer import (BPETokenizer, ByteTokenizer, _byte_alphabet, tokenizer_from_json,
                                train_bpe)


def test_jsonl_lone_surrogate_escape_is_replaced_not_a_traceback(tmp_path):
    """json.loads turns "\\ud800" into a lone surrogate, which no UTF-8 encoder (bytes or BPE)
    takes: UnicodeEncodeError in the cache build, a traceback from `dropless train`."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a \\ud800 b"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    docs = data.read_documents(str(path))
    assert docs == [("docs.jsonl:1", "a \ufffd\ufffd\ufffd b"), ("docs.jsonl:2", "pair \U0001F600 ok")]
    tok = ByteTokenizer()
    tokens = data.load_tokens(docs, tok, tmp_path / "cache")
    # two documents too short to split by name: their joined text, cut near its end
    cached = tok.decode(tokens.train.tolist()) + tok.decode(tokens.val.tolist())
    assert cached == "a \ufffd\ufffd\ufffd b" + data.DOC_SEPARATOR + "pair \U0001F600 ok"
    assert len(tokens.val) > 0


@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "1" * 5000])
def test_jsonl_line_too_deep_or_too_long_a_number_is_one_error(tmp_path, value):
    """RecursionError and int's 4300-digit ValueError are not JSONDecodeErrors: tracebacks."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "x", "extra": ' + value + "}\n")
    with pytest.raises(DroplessError, match="line 2 is not valid JSON"):
        data.read_documents(str(path))


def test_deeply_nested_json_files_are_one_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DroplessError, match="is not readable JSON"):
        read_small_json(path)
    with pytest.raises(ValueError, match="not a tokenizer: invalid JSON"):
        tokenizer_from_json(path.read_text())


def test_byte_level_piece_outside_the_alphabet_decodes_as_its_text():
    """A tokenizer.json may hold pieces that are not byte-alphabet strings (a stray special token
    never registered as added): the model can still sample them. KeyError mid-generation before;
    `tokenizers`' own ByteLevel decoder falls back to the piece's text."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    vocab = {**_byte_alphabet(), "Ġhello\u03a9": 256, "<|end|>": 257}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    tok = BPETokenizer(hf)
    assert tok.token_bytes(256) == "Ġhello\u03a9".encode()
    assert tok.decode([72, 256, 257]) == hf.decode([72, 256, 257])


def test_tokenizer_json_saved_with_truncation_and_padding_encodes_whole_texts():
    """`tokenizers` applies a tokenizer.json's "truncation"/"padding" in encode: every document of
    the token cache (and every prompt) was cut to max_length, or padded with pad ids."""
    tok = train_bpe(["hello world " * 100], 300)
    spec = json.loads(tok.to_json())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                          "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}
    loaded = tokenizer_from_json(json.dumps(spec))
    text = "hello world " * 10
    assert loaded.encode(text).tolist() == tok.encode(text).tolist()
    assert [ids.tolist() for ids in loaded.encode_batch(["hi", text])] == [
        tok.encode("hi").tolist(), tok.encode(text).tolist()]


def _sentencepiece_like():
    """A BPE as Mixtral's tokenizer.json has it: '▁' for spaces, byte-fallback pieces <0xNN>, and
    a decoder that strips the text's first space."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(["hello world, how are you?"] * 20, trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"].update({f"<0x{b:02X}>": 80 + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer_from_json(tok.to_str())


def test_sentencepiece_tokens_stream_with_their_spaces_and_bytes():
    """generate and serve stream token_bytes: decoded alone, each '▁word' lost its space (the
    decoder strips a text's first one) and each byte-fallback piece became U+FFFD."""
    tok = _sentencepiece_like()
    ids = tok.encode("hello world é😀 how are you").tolist()
    streamed = b"".join(tok.token_bytes(i) for i in ids).decode()
    assert streamed == " hello world é😀 how are you"   # a continuation keeps its first space
    assert tok.decode(ids) == streamed[1:]
    assert tok.token_bytes(10_000) == b""   # past the vocabulary


def test_tokenizer_that_cannot_encode_the_anchor_still_loads():
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    hf = HFTokenizer(models.WordLevel(vocab={"x": 0, "y": 1}))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tokenizer_from_json(hf.to_str())
    assert tok.encode("x y").tolist() == [0, 1] and tok.token_bytes(1) == b"y"


def test_metrics_log_rewrite_on_resume_is_atomic(tmp_path):
    """Resuming rewrites metrics.jsonl without the steps past the checkpoint: a disk that fills
    (here: a file size limit) during that rewrite left the run's log cut short, its history lost."""
    path = tmp_path / "metrics.jsonl"
    old = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 50))
    path.write_text(old)
    assert run_out_of_space("from pathlib import Path\nfrom dropless.runlog import MetricsLog",
                            "MetricsLog(Path(sys.argv[1]), keep_through=40)", path, limit=200) == 3
    assert path.read_text() == old


def test_directory_links_are_not_followed_and_not_skipped_silently(tmp_path):
    """os.walk does not follow links to directories (a loop would never end): their files were
    left out of the corpus without a word."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.txt").write_text("beta")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha")
    (corpus / "linked").symlink_to(tmp_path / "other")
    (corpus / "loop").symlink_to(corpus)
    with pytest.warns(UserWarning, match="skipped 2 .*: linked/, loop/"):
        assert data.read_documents(str(corpus)) == [("a.txt", "alpha")]


def test_jsonl_with_a_utf8_bom_is_read(tmp_path):
    """Windows editors (and PowerShell's Out-File) start UTF-8 files with a BOM: the first line
    was refused as invalid JSON."""
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "alpha"}\n{"text": "beta"}\n')
    assert data.read_documents(str(path)) == [("docs.jsonl:1", "alpha"), ("docs.jsonl:2", "beta")]


def _tiny_validation_corpus():
    """400 files; those the name hash picks for validation are empty (an __init__.py)."""
    picked = [data._hash64(f"pkg{i}/__init__.py") % 100 < data.VAL_PERCENT for i in range(400)]
    assert sum(picked) > 5
    return [(f"pkg{i}/__init__.py", "" if p else f"value_{i} = {i} * 2\n" * 40)
            for i, p in enumerate(picked)]


def test_validation_of_only_tiny_documents_is_refused_no_more(tmp_path):
    """A large corpus whose documents that the name hash picks for validation are empty or tiny
    had a validation split of a few tokens: `train` refused it for any --seq-len. A side under
    half its share of the text is cut from the whole instead, as a single file is."""
    docs = _tiny_validation_corpus()
    train, val = data.split_documents(docs)
    total = sum(len(text) for _, text in docs)
    assert sum(map(len, val)) >= total * data.VAL_PERCENT // 200
    assert data.split_documents(docs) == (train, val)   # deterministic
    tokens = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache")
    data.check_length(tokens, 256)


def _key_before_the_cut_rule(docs) -> str:
    h = hashlib.sha256(f"{data.CACHE_VERSION}|{data.VAL_PERCENT}|".encode())
    h.update(hashlib.sha256(ByteTokenizer().to_json().encode()).digest())
    for name, text in docs:
        h.update(hashlib.sha256(name.encode()).digest())
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:32]


def test_only_corpora_split_differently_get_a_new_cache_key():
    """A checkpoint records the cache key that proves its tokens: a corpus now cut by position
    needs a new one (a cache entry of the old split must not be reused), the others keep theirs,
    so their caches and checkpoints stay valid."""
    same = [(f"pkg/mod{i}.py", f"text {i}\n" * 30) for i in range(400)]
    assert data.cache_key(same, ByteTokenizer()) == _key_before_the_cut_rule(same)
    cut = _tiny_validation_corpus()
    assert data.cache_key(cut, ByteTokenizer()) != _key_before_the_cut_rule(cut)


def test_metrics_log_is_strict_json_and_resumes_over_nulls_and_non_records(tmp_path):
    """A NaN or infinite loss was written as `NaN`/`Infinity`, which strict JSON readers (jq, JS,
    other languages' parsers) refuse: it is null. Resuming over a log with nulls, and with lines
    that are JSON but not records (`[]`, `3`), raised TypeError instead of skipping them."""
    from dropless.runlog import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n[]\n3\n{"step": 2, "loss": null}\n'
                    '{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"skipped 3 malformed lines \(2, 3, 6\)"):
        log = MetricsLog(path, keep_through=3)
    log.write({"step": 4, "loss": float("nan"), "val_loss": float("inf"),
               "expert_load": [[float("-inf"), 0.5]]})
    log.file.close()

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None},
                       {"step": 3, "loss": 1.0},
                       {"step": 4, "loss": None, "val_loss": None, "expert_load": [[None, 0.5]]}]
