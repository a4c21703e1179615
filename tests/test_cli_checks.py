"""The command line's refusals of inputs that once failed late, obscurely or not at all: each one
line on stderr, exit code 1, before anything is written."""

import io

import pytest

from dropless import cli
from dropless.config import SHAPE_PRESETS
from tests.test_cli import _fails


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_train_refuses_a_shape_only_preset(capsys, tmp_path, preset):
    """A public model's shape (mixtral-8x7b: 47 B parameters) allocated until the OOM killer came,
    leaving an empty run directory: refused before the directory exists."""
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--preset", preset],
           f"preset={preset!r} is invalid: it is a public model's shape for `dropless info` and "
           "benchmarks only; trainable: tiny, small, medium")
    assert not (tmp_path / "run").exists()


def test_chat_defaults_talk_to_a_tiny_model(trained_run, monkeypatch, capsys):
    """512 tokens per reply was tiny's whole context: every message was "not sent". Left out, a
    reply gets half the context; a value that leaves no room for a message is refused at once."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert cli.main(["chat", str(trained_run), "--device", "cpu", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and err == "", err
    _fails(capsys, ["chat", str(trained_run), "--max-new-tokens", "512"],
           "--max-new-tokens 512 is invalid: must be below the model's context of 512 tokens")


def test_generate_names_a_prompt_longer_than_the_context(trained_run, capsys):
    """A 600-token prompt blamed --max-new-tokens 200, a flag the user never passed."""
    _fails(capsys, ["generate", str(trained_run), "--prompt", "x" * 600, "--device", "cpu"],
           "--prompt is 600 tokens: the model's context is 512 (max_seq_len)")
    _fails(capsys, ["generate", str(trained_run), "--prompt", "x" * 400, "--device", "cpu"],
           "--max-new-tokens 200 is invalid: prompt + it = 600 tokens exceeds the model's "
           "max_seq_len=512")


def test_quantize_checks_calib_seq_len_against_the_context_first(trained_run, tmp_path, capsys):
    """--calib-seq-len 100000 blamed the --calib-samples left at its default."""
    _fails(capsys, ["quantize", str(trained_run), "--out", str(tmp_path / "q"), "--calib-seq-len",
                    "100000"], "--calib-seq-len 100000 is invalid: must be in [1, 512] (the "
           "model's max_seq_len=512")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, what", [
    (["eval", "{file}"], "run or Hugging Face directory"),
    (["quantize", "{file}", "--out", "{tmp}/q"], "run or Hugging Face directory"),
    (["train", "--resume", "{file}"], "run directory"),
    (["convert", "--to-hf", "{file}", "{tmp}/hf"], "run directory"),
    (["convert", "{file}", "--to-safetensors", "{tmp}/m.safetensors"], "run directory"),
    (["generate", "{file}"], "run directory"),
])
def test_a_file_where_a_directory_belongs_is_named_a_file(tmp_path, capsys, argv, what):
    """eval, quantize, train --resume and convert said "no such run directory" of a file."""
    file = tmp_path / "notes.txt"
    file.write_text("not a run")
    _fails(capsys, [a.format(file=file, tmp=tmp_path) for a in argv],
           f"{file}: a file, not a {what}")
    assert sorted(tmp_path.iterdir()) == [file]


def test_serve_names_a_file_a_file(tmp_path):
    from dropless.errors import DroplessError
    from dropless.serve.text import load_served_model

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(DroplessError, match="notes.txt: a file, not a run or Hugging Face dir"):
        load_served_model(str(tmp_path / "notes.txt"), "cpu")


def test_bpe_smaller_than_vocab_is_said(tmp_path, capsys):
    """--vocab 4096 on a small text made a tokenizer of a few hundred tokens in silence."""
    text = tmp_path / "small.txt"
    text.write_text("the cat sat on the mat; the dog sat on the log.\n" * 200)
    with pytest.warns(UserWarning, match=r"--vocab 4096: the training text yields only \d+ BPE "
                                         "tokens, the model's vocabulary size"):
        assert cli.main(["train", "--data", str(text), "--out", str(tmp_path / "run"),
                         "--tokenizer", "bpe", "--vocab", "4096", "--steps", "1", "--seq-len",
                         "16", "--batch-size", "2", "--sample-tokens", "0", "--quiet",
                         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0


@pytest.mark.parametrize("command, defaults", [
    ("generate", ["per prompt (default 200)", "greedy (default 0.8)", "(default auto)"]),
    ("chat", ["greedy (default 0.7)", "(default auto)"]),
    ("quantize", ["(default 4)", "(default 128)", "(default auto)",
                  "context (default 512, or the model's max_seq_len where that is shorter)"]),
])
def test_help_shows_the_defaults(capsys, command, defaults):
    """As train's --help does: generate's, chat's and quantize's showed none."""
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps to the terminal's width
    assert all(d in out for d in defaults), out
