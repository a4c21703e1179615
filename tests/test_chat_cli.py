"""`dropless chat`: each stdin line a user's message; the reply (greedy here) is the model's on the
chat template's rendering of the whole history, stops at EOS, and joins the history; turns that
no longer fit the context are dropped oldest first; a message that cannot fit is skipped."""

import io
import json
import shutil

import pytest

from dropless import cli
from dropless.checkpoint import load_run
from dropless.generate import greedy_recompute
from dropless.serve.chat_template import render_chat
from dropless.tokenizer import ByteTokenizer

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture
def chat_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return run


def _reply(model, messages, n, eos=()):
    ids = list(render_chat(TEMPLATE, messages, {}).encode())
    out = greedy_recompute(model, ids, n)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return ByteTokenizer().decode(out[:cut], continuation=True)


def test_turns_carry_the_history(chat_run, monkeypatch, capsys):
    model = load_run(chat_run)[0].eval()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nmore please\n/exit\nnot read\n"))
    assert cli.main(["chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "6",
                     "--system", "be brief", "--device", "cpu"]) == 0
    system = [{"role": "system", "content": "be brief"}]
    first = _reply(model, system + [{"role": "user", "content": "hi"}], 6)
    second = _reply(model, system + [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": first},
                                     {"role": "user", "content": "more please"}], 6)
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_eos_ends_a_reply_and_old_turns_make_room(chat_run, monkeypatch, capsys):
    model = load_run(chat_run)[0].eval()
    context = model.cfg.max_seq_len
    greedy = greedy_recompute(model, list(b"[user] a\n[assistant] "), 8)
    eos = greedy[3]
    (chat_run / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    long = "x" * (context // 2)
    huge = "z" * (40 * context)   # past even the renderer's bound
    monkeypatch.setattr("sys.stdin", io.StringIO(
        f"a\n{long}\n{long}\n{'y' * context}\n{huge}\nb\u0000\ud800\n"))
    assert cli.main(["chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    replies = out.split("\n")[:-1]
    assert replies[0] == _reply(model, [{"role": "user", "content": "a"}], 8, (eos,))
    assert len(replies) == 4   # the messages longer than the context were not sent
    assert err.count("exceeds the model's context") == err.count("\n") == 2
    # the third long message left room only by dropping the turns before it
    assert replies[2] == _reply(model, [{"role": "user", "content": long}], 8, (eos,))
    assert replies[3] == _reply(model, [{"role": "user", "content": "b\u0000?"}], 8, (eos,))
