"""The command line into a pipe whose reader goes away (`dropless ... | head`): a quiet exit with
code 141, never a traceback, and a training run stops with its checkpoint saved.

The commands run as a user's shell runs them: without PYTHONUNBUFFERED (which a CI or a container
may set), so that stdout into a pipe is block-buffered and what is printed last is written only
when the interpreter flushes it, after `main` returned."""

import re
import subprocess
import sys

import pytest

from conftest import subprocess_env
from dropless import cli
from dropless.parallel import checkpoint as ckpt


def _user_env() -> dict:
    return {k: v for k, v in subprocess_env().items() if k != "PYTHONUNBUFFERED"}


def _dropless(*argv, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dropless", *map(str, argv)], env=_user_env(),
                            stdout=subprocess.PIPE, stderr=stderr)


@pytest.mark.parametrize("argv", [
    ["info"], ["info", "--preset", "tiny"], ["--help"], ["eval", "RUN", "--json"], ["eval", "RUN"],
    ["generate", "RUN", "--prompt", "a", "--prompt", "b", "--max-new-tokens", "2"],
    ["convert", "RUN", "--to-safetensors", "OUT"],
])
def test_a_reader_gone_before_any_output_is_a_quiet_exit(trained_run, tmp_path, argv):
    """`dropless info | true`: the reader is gone before the command prints; what it printed sat
    in stdout's buffer until the interpreter flushed it at exit: "Exception ignored ...
    BrokenPipeError" on stderr and exit code 120 (or a traceback from main's own flush)."""
    names = {"RUN": trained_run, "OUT": tmp_path / "m.safetensors"}
    proc = _dropless(*(names.get(a, a) for a in argv))
    proc.stdout.close()   # `| true`: nobody reads
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    # generate's tokens/s goes to stderr, which is still read, before stdout is flushed
    assert re.fullmatch(r"(\d+ tokens in .* tokens/s\)\n)?", err), err


def test_generate_into_a_pipe_that_closes_is_a_quiet_exit(trained_run):
    proc = _dropless("generate", trained_run, "--max-new-tokens", "400", "--temperature", "0")
    assert proc.stdout.read(2) == b"de"   # like `| head -c 2`: read a little, then hang up
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_train_into_a_closed_pipe_stops_with_a_checkpoint(tmp_path, corpus, stream):
    """`dropless train | head -1` (or `2>&1 | head -1`): each evaluation line reaches the pipe as
    it is printed (block-buffered, head saw nothing until the run had ended), and when the reader
    goes the run stops as on Ctrl-C, with a checkpoint to resume from, instead of dying at its
    next line with nothing saved."""
    out = tmp_path / "run"
    proc = _dropless("train", "--data", corpus, "--out", out, "--cache-dir", tmp_path / "cache",
                     "--steps", "20", "--batch-size", "2", "--seq-len", "16", "--eval-every", "1",
                     "--eval-batches", "1", "--quiet",
                     stderr=subprocess.STDOUT if stream == "stderr" else subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"step      1: train loss")   # `| head -1`
    proc.stdout.close()
    err = b"" if stream == "stderr" else proc.stderr.read()
    assert proc.wait(timeout=300) == 141 and b"Traceback" not in err, err
    path = ckpt.latest(out)
    assert path is not None
    step = ckpt.read_state(path)["step"]
    assert 1 <= step < 20
    if stream == "stdout":
        assert err.decode() == (f"dropless: the output pipe closed: stopped at step {step}/20, "
                                f"checkpoint saved; resume with: dropless train --resume {out}\n")
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0   # and it resumes


@pytest.mark.parametrize("prompts", [["a"], ["a", "b"]])
def test_generate_text_comes_before_its_stats_in_one_file(trained_run, prompts):
    """`dropless generate ... > out.txt 2>&1`: the text (block-buffered stdout) is written before
    the tokens/s line (stderr), which starts a line of its own."""
    argv = [a for p in prompts for a in ("--prompt", p)]
    proc = _dropless("generate", trained_run, *argv, "--max-new-tokens", "3",
                     stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=300) == 0, out
    assert re.search(r"\n\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)\n\Z", out), out
    assert out.count("tokens/s") == 1
