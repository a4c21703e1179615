"""Adversarial cases for the data side: corpus files, token cache, tokenizers, run logs."""

from dropless import data
from dropless.tokenizer import ByteTokenizer


def test_jsonl_lone_surrogate_escape_is_replaced_not_a_traceback(tmp_path):
    """json.loads turns "\\ud800" into a lone surrogate, which no UTF-8 encoder (bytes or BPE)
    takes: UnicodeEncodeError in the cache build, a traceback from `dropless train`."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a \\ud800 b"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    docs = data.read_documents(str(path))
    assert docs == [("docs.jsonl:1", "a \ufffd\ufffd\ufffd b"), ("docs.jsonl:2", "pair \U0001F600 ok")]
    tokens = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache")
    assert len(tokens.train) + len(tokens.val) > 0
