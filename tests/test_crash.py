"""Runs killed at the worst moment (simulated by a write that raises there): what a user's rerun
or --resume then finds must be whole, never a half-written output taken for a complete one."""

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
