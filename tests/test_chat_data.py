"""Conversations as training data: a .jsonl line {"messages": [...]} is rendered whole (no
generation prompt) by the model's chat template, in the sandboxed renderer; `train --init`
renders in the source's template, `eval` and `quantize` in the model directory's; a quantized
model keeps its source's chat files."""

import json
import shutil
import warnings

import pytest

from dropless import cli, data
from dropless.errors import DroplessError
from tests.test_quant_run import quantize

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
            "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}")
CHAT = (TEMPLATE, {"bos_token": "^", "eos_token": "$"})
TALK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _jsonl(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_conversations_render_whole(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"text": "plain"}, {"messages": TALK}, {"text": "last"})
    docs = data.read_documents(str(path), "--data", CHAT)
    assert docs == [("d.jsonl:1", "plain"), ("d.jsonl:2", "^<user>hi$<assistant>hello$"),
                    ("d.jsonl:3", "last")]
    plain = data.read_documents(str(path))[1][1]   # no template given: the plain default
    assert plain == "user: hi\nassistant: hello\n"


@pytest.mark.parametrize("record, says", [
    ({"messages": []}, 'line 1: "messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": 5}]}, 'line 1: "messages" must be'),
    ({"messages": "hi"}, 'line 1: "messages" must be'),
    ({"other": 1}, 'line 1 has no "text" string field (nor "messages", nor "prompt" and '
                   '"completion")'),
    ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]},
     'line 1: "prompt" must be a non-empty list'),
])
def test_bad_conversations(tmp_path, record, says):
    with pytest.raises(DroplessError, match=says.replace("(", r"\(").replace(")", r"\)")):
        data.read_documents(str(_jsonl(tmp_path / "d.jsonl", record)))


def test_a_template_that_raises_names_the_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"text": "a"}, {"messages": TALK})
    with pytest.raises(DroplessError, match="line 2: the chat template failed: no assistants"):
        data.read_documents(str(path), "--data", ("{{ raise_exception('no assistants') }}", {}))


def test_finetune_on_conversations(trained_run, tmp_path, corpus, capsys):
    """--init from a directory with a chat template: the conversations train in it (the run's
    token cache holds their rendering), eval reads them the same way, and a quantized copy keeps
    the chat files."""
    src = tmp_path / "src"
    shutil.copytree(trained_run, src)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE,
                                                           "bos_token": "^", "eos_token": "$"}))
    talks = [{"messages": [{"role": "user", "content": f"question {i} " * 3},
                           {"role": "assistant", "content": f"answer {i} " * 5}]}
             for i in range(60)]
    train = _jsonl(tmp_path / "talks.jsonl", *talks)
    out, cache = tmp_path / "ft", tmp_path / "cache"
    assert cli.main(["train", "--init", str(src), "--data", str(train), "--out", str(out),
                     "--cache-dir", str(cache), "--steps", "2", "--batch-size", "2",
                     "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
                     "--sample-tokens", "0", "--quiet"]) == 0
    [entry] = [p for p in cache.iterdir()]
    rendered = bytes(open(entry / "train.bin", "rb").read()[::2])   # uint16 byte ids
    assert b"^<user>question" in rendered and b"answer 1 $" in rendered
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--json", "--cache-dir", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0
    assert len(list(cache.iterdir())) == 1   # the same rendering, the same cache entry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(out, tmp_path / "q", corpus, "--group-size", "32") == 0
    assert json.loads((tmp_path / "q" / "tokenizer_config.json").read_text())[
        "chat_template"] == TEMPLATE


def test_convert_carries_the_chat_files(trained_run, tmp_path):
    """Both ways: an HF directory's EOS ids and chat template reach the run, and back."""
    hf, run, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    assert cli.main(["convert", "--to-hf", str(trained_run), str(hf)]) == 0
    assert not (hf / "tokenizer_config.json").exists()   # the run had none
    files = {"tokenizer_config.json": json.dumps({"chat_template": TEMPLATE}),
             "generation_config.json": json.dumps({"eos_token_id": 3})}
    for name, text in files.items():
        (hf / name).write_text(text)
    assert cli.main(["convert", "--from-hf", str(hf), str(run)]) == 0
    assert cli.main(["convert", "--to-hf", str(run), str(back)]) == 0
    for d in (run, back):
        assert {name: (d / name).read_text() for name in files} == files


def test_eos_ids_kept_in_config_json_reach_the_run(trained_run, tmp_path, corpus, capsys):
    """An HF directory that names its EOS ids in config.json alone: convert and train --init write
    them into the run's generation_config.json beside the fields it had (a run directory has no
    config.json, and a model without its EOS runs past it); serve and generate read the same."""
    from dropless.checkpoint import load_model_dir
    from dropless.serve.text import chat_metadata

    hf = tmp_path / "hf"
    assert cli.main(["convert", "--to-hf", str(trained_run), str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "eos_token_id": [5, 6]}))
    (hf / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    run, tuned = tmp_path / "run", tmp_path / "ft"
    assert cli.main(["convert", "--from-hf", str(hf), str(run)]) == 0
    assert cli.main(["train", "--init", str(hf), "--data", str(corpus), "--out", str(tuned),
                     "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "1",
                     "--eval-batches", "1", "--sample-tokens", "0", "--quiet"]) == 0
    for d in (run, tuned):
        assert json.loads((d / "generation_config.json").read_text()) == {
            "do_sample": True, "eos_token_id": [5, 6]}
        assert chat_metadata(d, 256, load_model_dir(d)[1])[0] == (5, 6)
