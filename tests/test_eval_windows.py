"""`dropless eval --seq-len / --batch-size / --eval-batches`: the windows a run or HF directory is
scored on, the whole validation split with `--eval-batches 0`, and the flags' errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from dropless import cli, data, evaluate, train
from dropless.checkpoint import load_run


@pytest.fixture
def recorded(monkeypatch):
    """The validation tokens eval read and the windows it scored (as a list)."""
    seen = {}
    real_load, real_eval = data.load_tokens, train.evaluate

    def load(*args, **kwargs):
        seen["tokens"] = real_load(*args, **kwargs)
        return seen["tokens"]

    def score(model, windows, *args, **kwargs):
        seen["windows"] = list(windows)
        return real_eval(model, seen["windows"], *args, **kwargs)
    monkeypatch.setattr(data, "load_tokens", load)
    monkeypatch.setattr(train, "evaluate", score)
    return seen


def _oracle_loss(model, val, seq_len: int) -> tuple[float, int]:
    """The mean next-token loss over consecutive windows of `val`, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(val) - seq_len, seq_len):
            w = torch.from_numpy(val[s:s + seq_len + 1].astype("int64")).unsqueeze(0)
            logits = model(w[:, :-1])[0]
            total += F.cross_entropy(logits[0].float(), w[0, 1:], reduction="sum").item()
            count += seq_len
    return total / count, count


@pytest.mark.parametrize("batch_size", [1, 5])
def test_eval_batches_0_scores_the_whole_split(trained_run, recorded, batch_size):
    r = evaluate.evaluate_dir(trained_run, device="cpu",
                              windows={"eval_batches": 0, "seq_len": 16, "batch_size": batch_size})
    val = recorded["tokens"].val
    xs = torch.cat([x for x, _ in recorded["windows"]])
    ys = torch.cat([y for _, y in recorded["windows"]])
    n = (len(val) - 1) // 16
    assert xs.shape == ys.shape == (n, 16) and r["tokens"] == n * 16
    assert {len(x) for x, _ in recorded["windows"][:-1]} <= {batch_size}
    # consecutive, not overlapping: the inputs are the split's first n * 16 tokens in order
    assert xs.flatten().tolist() == val[:n * 16].tolist()
    assert ys.flatten().tolist() == val[1:n * 16 + 1].tolist()
    want, count = _oracle_loss(load_run(trained_run)[0].eval(), val, 16)
    assert count == r["tokens"] and r["val_loss"] == pytest.approx(want, rel=1e-5)


def test_window_flags_replace_the_runs(trained_run, recorded, capsys):
    assert cli.main(["eval", str(trained_run), "--json", "--seq-len", "8", "--batch-size", "3",
                     "--eval-batches", "2"]) == 0
    json.loads(capsys.readouterr().out)
    assert [tuple(x.shape) for x, _ in recorded["windows"]] == [(3, 8), (3, 8)]
    assert cli.main(["eval", str(trained_run)]) == 0   # the run's own: batch 2, seq 16, 8 batches
    assert capsys.readouterr().out.endswith(f"over {2 * 16 * 8:,} tokens\n")
    assert [tuple(x.shape) for x, _ in recorded["windows"]] == [(2, 16)] * 8


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "--seq-len 0 is invalid: must be an integer in [1, "),
    (["--seq-len", "100000"], "--seq-len 100000 is invalid: the model's context is 512 tokens"),
    (["--batch-size", "-2"], "--batch-size -2 is invalid: must be an integer >= 1"),
    (["--eval-batches", "-1"], "--eval-batches -1 is invalid: must be an integer >= 0 (0: the "
                               "whole split)"),
    (["--batch-size", "100000", "--seq-len", "512", "--eval-batches", "1000"],
     "--eval-batches x --batch-size x --seq-len = 51200000000 is invalid: must be at most"),
])
def test_bad_window_flags_are_refused(trained_run, capsys, argv, message):
    assert cli.main(["eval", str(trained_run), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dropless: error: ") and err.count("\n") == 1 and message in err, err


def test_a_long_eval_shows_a_bar_on_stderr(trained_run, capsys, monkeypatch):
    """The bar counts batches on stderr (once the scoring took BAR_DELAY_S, here 0); stdout
    keeps the one JSON line."""
    from dropless import tokenizer
    monkeypatch.setattr(tokenizer, "BAR_DELAY_S", 0.0)
    assert cli.main(["eval", str(trained_run), "--json", "--eval-batches", "3"]) == 0
    out, err = capsys.readouterr()
    assert set(json.loads(out)) == {"val_loss", "val_ppl"}
    assert "eval: " in err and "0/3 [" in err and "batch/s" in err, err
