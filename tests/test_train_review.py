"""dropless train and info as a user runs them: what a resumed run reports, runs that go wrong."""

import json
import os
import signal
import types
from dataclasses import replace

import pytest

from dropless import cli, data
from dropless import train as train_module
from dropless.checkpoint import resume_config
from dropless.plots import write_plots
from dropless.train import train


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_reports_as_an_uninterrupted_one(small_cfg, tmp_path, monkeypatch):
    """Stopped between two metrics lines and resumed: the summary's train loss (the last 20
    steps) includes the steps before the checkpoint, and a line's tokens/s counts only the steps
    this process timed. The clock advances one second per batch, so every line reads exactly
    one step's tokens per second."""
    now = [0.0]
    get_batch = data.get_batch

    def timed_batch(*args, **kwargs):
        now[0] += 1.0
        return get_batch(*args, **kwargs)
    monkeypatch.setattr(data, "get_batch", timed_batch)
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    cfg = small_cfg(out=str(tmp_path / "straight"), log_every=4, eval_every=100, sample_tokens=0)
    straight = train(cfg, progress=False)

    def ctrl_c_at_2(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)
    split = replace(cfg, out=str(tmp_path / "split"))
    assert not train(split, progress=False, on_step=ctrl_c_at_2)["finished"]
    resumed_cfg, state = resume_config(tmp_path / "split", {})
    resumed = train(resumed_cfg, state=state, progress=False)

    assert resumed["train_loss"] == straight["train_loss"]
    per_step = cfg.batch_size * cfg.seq_len
    for run in ("straight", "split"):
        records = _metrics(tmp_path / run)
        assert [r["step"] for r in records] == [4, 6]
        assert [r["tokens_per_s"] for r in records] == [per_step, per_step], run


def test_a_diverged_run_still_gets_its_plots(tmp_path):
    """A learning rate far too high makes the losses inf or NaN: the run ends with its plots and
    summary, not with matplotlib's traceback about the axis limits."""
    loads = [[0.5, 0.5]]
    lines = [{"step": 1, "loss": 5.0, "expert_load": loads},
             {"step": 2, "loss": float("inf"), "expert_load": loads},
             {"step": 3, "loss": float("nan"), "val_loss": float("nan"), "expert_load": loads}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    paths = write_plots(tmp_path, baseline=3.0)
    assert [p.name for p in paths] == ["loss.png", "expert_load.png"]
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize("preset", [[], ["--preset", "tiny"]])
def test_info_refuses_a_context_too_long_to_count(capsys, preset):
    """A sequence length past any model's positions is one line, not an OverflowError from
    formatting its FLOPs."""
    assert cli.main(["info", *preset, "--seq-len", str(10**400)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dropless: error: --seq-len") and err.count("\n") == 1, err


@pytest.mark.parametrize("flag", ["--data", "--cache-dir", "--out"])
def test_an_empty_path_is_refused_not_the_working_directory(capsys, tmp_path, monkeypatch, corpus,
                                                            flag):
    """`--data "$DATA"` with DATA unset used to train on every file under the working directory;
    an empty --cache-dir wrote the token cache there, an empty --out fell back to runs/<time>."""
    monkeypatch.chdir(tmp_path)
    paths = {"--data": str(corpus), "--cache-dir": "cache", "--out": "run", flag: ""}
    argv = ["train", *(x for kv in paths.items() for x in kv), "--steps", "1", "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dropless: error: ") and "must name a path" in err, err
    assert list(tmp_path.iterdir()) == []


def test_resume_replaces_the_tokenizer_json_never_rewrites_it_in_place(small_cfg, tmp_path):
    """Every start writes run_dir/tokenizer.json. Rewritten in place (truncate, then write), a
    crash or full disk midway left a run whose tokenizer is cut short, and a reader (`generate` on
    the run) could read half of it; through a temp file and a rename, the old file stays whole
    until the new one replaces it. A hard link to the old file (a `cp -al` backup) shows which."""
    def ctrl_c_at_1(step, loss):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
    cfg = small_cfg(steps=2, eval_every=100, sample_tokens=0)
    assert not train(cfg, progress=False, on_step=ctrl_c_at_1)["finished"]
    path = tmp_path / "run" / "tokenizer.json"
    old = path.read_text()
    os.link(path, tmp_path / "backup.json")
    resumed_cfg, state = resume_config(tmp_path / "run", {})
    assert train(resumed_cfg, state=state, progress=False)["finished"]
    assert path.read_text() == old and not path.samefile(tmp_path / "backup.json")


@pytest.mark.parametrize("eval_every", [1, 100])
def test_a_diverged_run_stops_with_an_error_and_saves_no_nan(capsys, tmp_path, corpus, eval_every):
    """--lr 1e9 makes step 1's update blow the weights up: the validation loss after step 1 is NaN
    (eval every step), else step 2's training loss is. The run stops there with one line that
    names the step and what to try, exit 1, and nothing past the last finite state is saved."""
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--out",
            str(out), "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
            "--lr", "1e9", "--warmup", "0", "--eval-every", str(eval_every), "--eval-batches", "1",
            "--ckpt-every", "1", "--grad-clip", "0", "--quiet"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()[-1]
    where = "validation loss became nan after step 1" if eval_every == 1 else \
        "training loss became nan at step 2"
    kept = "no checkpoint was saved" if eval_every == 1 else \
        f"the latest checkpoint (step 1) in {out} is left as it was"
    assert err == (f"dropless: error: the {where}: stopped, {kept}; try a lower --lr (this "
                   "run's: 1e+09) or --grad-clip 1.0 (this run's: off)"), err
    assert "trained tiny" not in captured.out
    saved = sorted(p.name for p in (out / "dcp").iterdir()) if (out / "dcp").exists() else []
    assert saved == ([] if eval_every == 1 else ["step-00000001"])
    assert all(json.loads(line)["loss"] is not None
               for line in (out / "metrics.jsonl").read_text().splitlines())


def test_stop_on_interrupt_restores_both_handlers():
    """The run's SIGINT and SIGTERM handlers hold only while its loop runs."""
    from dropless.runlog import StopOnInterrupt

    signals = (signal.SIGINT, signal.SIGTERM)
    before = [signal.getsignal(s) for s in signals]
    with StopOnInterrupt() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):   # a second one stops at once
            signal.raise_signal(signal.SIGINT)
    assert [signal.getsignal(s) for s in signals] == before
    with StopOnInterrupt(sigterm=False):   # under torchrun: SIGTERM's action stays the default
        assert signal.getsignal(signal.SIGTERM) == before[1]


@pytest.mark.parametrize("here,timed,recent", [(6, [2, 6], 6), (4, [32, 34], 20), (1, [7, 7], 1)])
def test_the_summary_says_what_it_timed(here, timed, recent):
    """The summary's time is the loop's, its tokens/s that of the steps it names; a resumed run
    says how many steps this process took, and the train loss over how many steps it is."""
    from dropless.runlog import format_summary

    steps = timed[1]
    s = {"finished": True, "preset": "tiny", "params": 1.81e6, "steps": steps, "step": steps,
         "steps_here": here, "timed_steps": timed, "elapsed_s": 12.4, "training_s": 5.2,
         "tokens_per_s": 1339.4, "precision": "fp32", "mfu": None, "train_loss": 3.0,
         "train_loss_steps": recent, "val_loss": 3.1, "unigram_baseline": 3.2,
         "run_dir": "runs/a", "plots": [], "sample": None}
    first, second = format_summary(s).splitlines()[:2]
    expected = {6: "for 6 steps; its training loop took 0m12s, of which steps 2-6 took 0m05s: "
                   "1,339 tokens/s, fp32 (the rest: step 1, evaluation and checkpoints)",
                4: "for 34 steps (4 in this process); its training loop took 0m12s, of which "
                   "steps 32-34 took 0m05s: 1,339 tokens/s, fp32 (the rest: step 31, evaluation "
                   "and checkpoints)",
                1: "for 7 steps (1 in this process); its training loop took 0m12s, of which "
                   "step 7 took 0m05s: 1,339 tokens/s, fp32 (the rest: evaluation and "
                   "checkpoints)"}[here]
    assert first == "trained tiny (1.81 M params) " + expected
    assert second.endswith("(mean of the last " + ("step)" if recent == 1 else f"{recent} steps)"))
