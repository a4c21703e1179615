"""`dropless generate` with a model directory's EOS ids and chat template: a row stops at EOS (not
printed) unless --ignore-eos; --chat renders each prompt as a user's message and prints the reply
alone; the tokens are greedy_recompute's on the rendered prompt."""

import json
import shutil

import pytest

from dropless import cli
from dropless.checkpoint import load_run
from dropless.generate import greedy_recompute
from dropless.tokenizer import ByteTokenizer

TEMPLATE = "<u>{{ messages[0]['content'] }}</u>{% if add_generation_prompt %}<a>{% endif %}"


@pytest.fixture
def chat_run(trained_run, tmp_path):
    """The trained run with a chat template and, as its EOS, the 4th greedy token of the chat
    prompt (one that is not among the first three)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    model = load_run(run)[0].eval()
    greedy = greedy_recompute(model, list(b"<u>hi</u><a>"), 12)
    k = next(i for i in range(3, 12) if greedy[i] not in greedy[:i])
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": greedy[k]}))
    return run, greedy, k


def printed(tokens) -> str:
    return ByteTokenizer().decode(tokens, continuation=True)


def test_chat_stops_at_eos(chat_run, capsys):
    run, greedy, k = chat_run
    argv = ["generate", str(run), "--chat", "--prompt", "hi", "--temperature", "0",
            "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == printed(greedy[:k]) + "\n"   # the reply alone, no EOS
    assert cli.main([*argv, "--ignore-eos"]) == 0
    assert capsys.readouterr().out == printed(greedy) + "\n"
    assert cli.main([*argv, "--prompt", "hi"]) == 0   # a batch: each reply under its header
    reply = printed(greedy[:k])
    assert capsys.readouterr().out == f"--- [0] ---\n{reply}\n--- [1] ---\n{reply}\n"


def test_plain_prompt_stops_at_eos_too(chat_run, capsys):
    run, _, _ = chat_run
    model = load_run(run)[0].eval()
    eos = json.loads((run / "generation_config.json").read_text())["eos_token_id"]
    greedy = greedy_recompute(model, list(b"def "), 30)
    assert cli.main(["generate", str(run), "--prompt", "def ", "--temperature", "0",
                     "--max-new-tokens", "30"]) == 0
    cut = greedy[:greedy.index(eos)] if eos in greedy else greedy
    assert capsys.readouterr().out == "def " + printed(cut) + "\n"


def test_a_template_that_fails_is_one_line(chat_run, capsys):
    run, _, _ = chat_run
    (run / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ raise_exception('no system role') }}"}))
    assert cli.main(["generate", str(run), "--chat", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dropless: error: {run}: the chat template failed: ") and (
        err.count("\n") == 1 and "no system role" in err), err


def test_generate_and_chat_decode_in_the_dtype_serve_does(trained_run, monkeypatch, capsys):
    """generate and chat load the model as serve does (decode_dtype: bf16 on CUDA): here the rule
    is made to say bf16 on the CPU, and the model generate decodes with is bf16."""
    import torch

    from dropless import generate as gen_module
    from dropless.serve import text

    assert text.decode_dtype(torch.device("cuda")) == torch.bfloat16
    assert text.decode_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(text, "decode_dtype", lambda device: torch.bfloat16)
    seen, real = [], gen_module.generate
    monkeypatch.setattr(gen_module, "generate",
                        lambda model, *a, **k: seen.append(model.embed.weight.dtype)
                        or real(model, *a, **k))
    assert cli.main(["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    assert seen == [torch.bfloat16] and capsys.readouterr().out.startswith("def ")
