"""Decoding as `dropless generate` and `dropless train`'s sample use it: the new tokens of a
continuation, printed after the prompt, must read as they stream (dropless.serve.text)."""

import dataclasses

import torch

from dropless import Transformer, get_preset
from dropless.cli import main
from dropless.convert import save_hf_dir
from dropless.tokenizer import ByteTokenizer, train_bpe
from test_data_review import _sentencepiece_like


def _streamed(tok, ids) -> str:
    return b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def test_decode_of_a_continuation_keeps_its_first_space():
    """A SentencePiece decoder strips a text's first space: right for a whole text, but the new
    tokens after a prompt ("hello world" + "▁é") lost it and glued the first word to the prompt."""
    tok = _sentencepiece_like()
    ids = tok.encode("hello world é😀 how are you").tolist()
    assert tok.decode(ids) == "hello world é😀 how are you"   # a whole text: as tokenizers does
    new = ids[3:]   # after "▁hello▁wor", "l", "d"
    assert tok.decode(new, continuation=True) == _streamed(tok, new) == " é😀 how are you"
    for other in (ByteTokenizer(), train_bpe(["hello world, how are you?"] * 20, 300)):
        new = other.encode(" world é😀").tolist()   # no first space to strip: the same either way
        assert other.decode(new, continuation=True) == other.decode(new) == " world é😀"


def test_generate_prints_a_continuation_as_it_streams(tmp_path, capsys):
    """One prompt streams token_bytes; several print prompt + decode(new): the same text."""
    tok = _sentencepiece_like()
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, max_seq_len=64,
                              vocab_size=tok.vocab_size, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    # greedy's first new token is "▁wor": swap its lm_head row with the one that wins now
    world, prompt = tok.tok.token_to_id("▁wor"), tok.encode("hello").tolist()
    with torch.no_grad():
        top = int(model(torch.tensor([prompt]))[0][0, -1].argmax())
        rows = model.lm_head.weight
        rows[[top, world]] = rows[[world, top]].clone()
    save_hf_dir(model, tmp_path, tok.to_json())
    argv = ["generate", str(tmp_path), "--max-new-tokens", "3", "--temperature", "0"]
    assert main([*argv, "--prompt", "hello"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("hello wor")
    assert main([*argv, "--prompt", "hello", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out == f"--- [0] ---\n{streamed}--- [1] ---\n{streamed}"


def test_byte_tokenizer_skips_ids_past_the_bytes():
    """A model whose vocabulary is larger than 256 can sample an id that is no byte: it has no
    text, as an id past a BPE tokenizer's vocabulary has none (it raised ValueError)."""
    tok = ByteTokenizer()
    assert tok.token_bytes(256) == tok.token_bytes(10_000) == b""
    assert tok.decode([104, 256, 105, 10_000]) == "hi"
    assert tok.decode([0xC3, 300, 0xA9], continuation=True) == "é"   # as the bytes stream
    bpe = train_bpe(["hello world"] * 20, 300)
    assert bpe.decode([*bpe.encode("hi").tolist(), bpe.vocab_size + 5]) == "hi"
