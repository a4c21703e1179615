"""Runs killed at the worst moment (simulated by a write that raises there): what a user's rerun
or --resume then finds must be whole, never a half-written output taken for a complete one."""

import os
from pathlib import Path

import pytest

from dropless import train as train_module
from dropless.checkpoint import resume_config
from dropless.errors import DroplessError
from dropless.parallel.checkpoint import latest_path, read_state
from dropless.train import train


class Killed(BaseException):
    """SIGKILL at this point: nothing after it runs (not even `except Exception` handlers)."""


def test_a_run_killed_writing_its_plots_resumes_and_writes_them(small_cfg, monkeypatch):
    """The plots come before the last checkpoint: killed after that checkpoint, a run was
    "finished" (--resume refused it) without loss.png ever written."""
    cfg = small_cfg(steps=4, ckpt_every=2, eval_every=2, sample_tokens=0)

    def killed(*args):
        raise Killed
    monkeypatch.setattr(train_module, "write_plots", killed)
    with pytest.raises(Killed):
        train(cfg, progress=False)
    monkeypatch.undo()
    run = Path(cfg.out)
    assert read_state(latest_path(run))["step"] == 2 and not (run / "loss.png").exists()
    resumed, state = resume_config(run, {})
    assert train(resumed, state=state, progress=False)["finished"]
    assert (run / "loss.png").is_file() and (run / "expert_load.png").is_file()
    assert read_state(latest_path(run))["step"] == 4


def test_a_run_killed_before_its_first_checkpoint_says_to_start_again(small_cfg, monkeypatch):
    """--resume of it said "no checkpoint found ...; is this a run directory of `dropless
    train`?" of the directory that train had made: starting it again is what works."""
    cfg = small_cfg(steps=4, ckpt_every=2, sample_tokens=0)

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(train_module.ckpt, "save", killed)
    with pytest.raises(Killed):
        train(cfg, progress=False)
    monkeypatch.undo()
    with pytest.raises(DroplessError, match="stopped before its first checkpoint.*start it "
                       "again with the same flags and --out, without --resume"):
        resume_config(cfg.out, {})
    assert train(cfg, progress=False)["finished"]   # as the message says
    assert read_state(latest_path(cfg.out))["step"] == 4


def test_the_metrics_log_is_on_disk_before_each_checkpoint(small_cfg, monkeypatch):
    """A power cut keeps a checkpoint (DCP and the manifest are fsynced) but may drop the
    metrics lines still in the page cache: the resumed run, keeping the lines through the
    checkpoint's step, would never write those again. The log is fsynced before every save."""
    cfg = small_cfg(steps=4, ckpt_every=2, sample_tokens=0)
    events, fsync, save = [], os.fsync, train_module.ckpt.save

    def watched_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/metrics.jsonl"):
            events.append(("fsync", os.fstat(fd).st_size))
        fsync(fd)

    def watched_save(run_dir, step, *args):
        events.append(("save", step, (Path(run_dir) / "metrics.jsonl").stat().st_size))
        return save(run_dir, step, *args)
    monkeypatch.setattr(os, "fsync", watched_fsync)
    monkeypatch.setattr(train_module.ckpt, "save", watched_save)
    train(cfg, progress=False)
    assert [e[0] for e in events] == ["fsync", "save"] * 2
    assert all(a[1] == b[2] > 0 for a, b in zip(events[::2], events[1::2]))   # all it held
