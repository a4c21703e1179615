"""--assistant-only-loss: the loss covers the assistant turns of conversations (their end-of-turn
included), found by rendering; everything else is a target the loss skips (IGNORE)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dropless import cli, data
from dropless.conversations import IGNORE, Rendered, cut, encode_stream, pieces, render_all
from dropless.errors import DroplessError
from dropless.tokenizer import ByteTokenizer

# the generation prompt is how an assistant turn starts: each turn is found by rendering
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = (TEMPLATE, {"eos_token": "$"})
TALK = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "no"}]


def _talks(path, n=80):
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is {i} plus {i}? " * 2},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n" for i in range(n)))
    return path


def test_assistant_turns_are_found_with_their_end_of_turn():
    [text] = render_all([(1, TALK, 0)], CHAT, "--data d.jsonl", assistant_only=True)
    assert text == "<system>be brief$<user>hi$<assistant>hello$<user>more$<assistant>no$"
    assert [text[a:b] for a, b in text.spans] == ["hello$", "no$"]
    # an assistant turn first, and a conversation without one
    [first, none] = render_all([(1, TALK[2:3], 0), (2, TALK[:2], 0)], CHAT, "x",
                               assistant_only=True)
    assert [first[a:b] for a, b in first.spans] == ["hello$"] and none.spans == ()


def test_a_template_whose_turns_are_not_prefixes_is_refused():
    """A generation prompt unlike the turn's header (or a template that rewrites earlier turns):
    no span can be found, and the run says so instead of masking the wrong characters."""
    other = (TEMPLATE.replace("<assistant>{% endif", "<gen>{% endif"), {"eos_token": "$"})
    with pytest.raises(DroplessError, match=r"^--data d.jsonl: line 7: --assistant-only-loss "
                                            "cannot find assistant turn 3: the chat template"):
        render_all([(7, TALK, 0)], other, "--data d.jsonl", assistant_only=True)


def test_pieces_cut_and_encode_keep_the_mask_on_its_characters():
    text = Rendered("<u>hi<a>yes$", [(8, 12)])
    parts = pieces([text, "plain"], "\n\n")
    assert parts == [("<u>hi<a>", False), ("yes$", True), ("\n\n", False), ("plain", True)]
    [(ids, mask)] = encode_stream(ByteTokenizer(), parts)   # one chunk
    assert bytes(ids.astype(np.uint8)) == b"<u>hi<a>yes$\n\nplain"
    assert bytes(ids[mask == 1].astype(np.uint8)) == b"yes$plain"
    head, tail = cut(parts, 10)   # inside the assistant span
    assert head == [("<u>hi<a>", False), ("ye", True)]
    assert tail == [("s$", True), ("\n\n", False), ("plain", True)]
    assert cut(parts, 100) == (parts, [])


def test_cached_masks_follow_the_tokens_and_batches_skip_the_rest(tmp_path):
    talks = _talks(tmp_path / "d.jsonl", 3)   # 3 conversations: a split by position
    docs = data.read_documents(str(talks), "--data", CHAT, assistant_only=True)
    tokens = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache", assistant_only=True)
    every = np.concatenate([tokens.train, tokens.val]).astype(np.uint8)
    mask = np.concatenate([tokens.train_mask, tokens.val_mask])
    assert bytes(every[mask == 1]) == b"".join(
        f"{i} plus {i} is {2 * i}.$".encode() for i in range(3))
    assert data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache").train_mask is None
    assert len(list((tmp_path / "cache").iterdir())) == 2   # its own cache entry
    x, y = data.get_batch(tokens.train, 4, 16, seed=0, step=0, mask=tokens.train_mask)
    assert ((y == IGNORE) | (y == x.roll(-1, 1)) | (torch.arange(16) == 15)).all()
    kept = y != IGNORE
    assert kept.any() and (~kept).any()
    # a damaged mask fails its checksum and is rebuilt, never trained on
    [entry] = [p for p in (tmp_path / "cache").iterdir() if (p / "train.mask").exists()]
    expected = np.array(tokens.train_mask)   # a copy: the memmap sees the file change
    (entry / "train.mask").write_bytes(b"\x01" * len(tokens.train))
    with pytest.warns(UserWarning, match="train.mask fails its checksum; rebuilding it"):
        again = data.load_tokens(docs, ByteTokenizer(), tmp_path / "cache", assistant_only=True)
    assert np.array_equal(again.train_mask, expected)


def test_loss_is_the_mean_over_covered_targets_and_zero_over_none(monkeypatch):
    from dropless.train import lm_loss

    logits = torch.randn(2, 5, 11, requires_grad=True)
    model = lambda x: (logits, None)   # noqa: E731
    y = torch.randint(0, 11, (2, 5))
    y[0, :3] = IGNORE
    loss, _ = lm_loss(model, y, y)
    keep = y != IGNORE
    assert torch.allclose(loss, F.cross_entropy(logits[keep], y[keep]))
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep] != 0).any()
    none, _ = lm_loss(model, y, torch.full_like(y, IGNORE))
    assert none.item() == 0.0


def test_train_eval_and_resume_on_assistant_turns(tmp_path, capsys):
    talks, run, cache = _talks(tmp_path / "d.jsonl"), tmp_path / "run", tmp_path / "cache"
    args = ["train", "--data", str(talks), "--assistant-only-loss", "--out", str(run),
            "--batch-size", "4", "--seq-len", "32", "--eval-every", "4", "--eval-batches", "2",
            "--sample-tokens", "0", "--cache-dir", str(cache), "--quiet"]
    assert cli.main(args + ["--steps", "4"]) == 0
    assert cli.main(["train", "--resume", str(run), "--steps", "8", "--quiet"]) == 0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in logged if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--json", "--cache-dir", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(val[-1], rel=1e-5)


@pytest.mark.parametrize("record, says", [
    ({"text": "no conversations here"}, "--assistant-only-loss needs conversations with an "
                                        "assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "needs conversations with an assistant"),
])
def test_the_flag_without_assistant_turns_is_refused(tmp_path, capsys, record, says):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert cli.main(["train", "--data", str(path), "--assistant-only-loss", "--out",
                     str(tmp_path / "run"), "--steps", "1", "--quiet"]) == 1
    assert says in capsys.readouterr().err


def test_prompt_completion_pairs(tmp_path):
    """{"prompt", "completion"} lines: two strings are one text, the completion covered; two
    message lists are one conversation, the completion's assistant turns covered (not the
    prompt's). Without the flag, each trains whole."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": TALK[1:3] + TALK[3:4], "completion": TALK[4:]},
        {"text": "plain"}]) + "\n")
    docs = data.read_documents(str(path), "--data", CHAT, assistant_only=True)
    covered = [[text[a:b] for a, b in getattr(text, "spans", [(0, len(text))])]
               for _, text in docs]
    assert covered == [["4$"], ["no$"], ["plain"]]   # a completion ends in the EOS text
    assert docs[1][1] == "<user>hi$<assistant>hello$<user>more$<assistant>no$"
    whole = data.read_documents(str(path), "--data", CHAT)
    assert [t for _, t in whole] == [t for _, t in docs] and not hasattr(whole[0][1], "spans")


def test_micro_batches_weigh_by_their_covered_targets():
    """grad_accum=2 == one big batch on the same tokens when the micro-batches cover unequal
    numbers of targets: each micro-batch's mean is weighted by its share (without the weights,
    its few targets would weigh as much as the other's many)."""
    from dropless.config import TrainConfig
    from tests.test_train_math import _build, _model_cfg, _step, _tokens

    tokens = _tokens(rows=4)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[:2, :30] = IGNORE   # the first micro-batch covers 4 targets, the second 64
    runs = {}
    for only, micro in ((True, 1), (True, 2), (False, 2)):
        tcfg = TrainConfig(out="unused", lr=1e-2, assistant_only_loss=only)
        model, opt = _build(_model_cfg(balance_loss_coef=0.0, z_loss_coef=0.0), tcfg)
        (lm, *_), grads = _step(model, opt, list(zip(x.chunk(micro), y.chunk(micro))), tcfg)
        runs[only, micro] = lm, torch.cat([g.flatten() for g in grads])
    (lm1, g1), (lm2, g2), (unweighted, _) = runs.values()
    torch.testing.assert_close(lm2, lm1, rtol=1e-6, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)
    assert abs(unweighted - lm1) > 1e-3


def test_eval_of_an_assistant_only_run_on_plain_text_says_the_run_asks(tmp_path, capsys):
    talks, run, cache = _talks(tmp_path / "d.jsonl"), tmp_path / "run", tmp_path / "cache"
    assert cli.main(["train", "--data", str(talks), "--assistant-only-loss", "--out", str(run),
                     "--batch-size", "4", "--seq-len", "32", "--steps", "1", "--eval-batches",
                     "1", "--sample-tokens", "0", "--cache-dir", str(cache), "--quiet"]) == 0
    plain = tmp_path / "plain.txt"
    plain.write_text("just text, no conversations\n" * 50)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--data", str(plain), "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert f"--data {plain}: the run (trained with --assistant-only-loss" in err
    assert "Traceback" not in err


def test_data_preparation_shows_its_bars_unless_quiet(tmp_path, capsys, monkeypatch):
    from dropless import tokenizer

    monkeypatch.setattr(tokenizer, "BAR_DELAY_S", 0)   # at once, not after 2 s
    talks = _talks(tmp_path / "d.jsonl")
    args = ["train", "--data", str(talks), "--assistant-only-loss", "--batch-size", "4",
            "--seq-len", "32", "--steps", "1", "--eval-batches", "1", "--sample-tokens", "0"]
    assert cli.main(args + ["--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "c1"),
                            "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "render conversations" not in err and "tokenize" not in err
    assert cli.main(args + ["--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c2")]) == 0
    err = capsys.readouterr().err
    assert "render conversations" in err and "tokenize" in err
