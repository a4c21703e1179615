import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env
from dropless import cli
from dropless.checkpoint import CHECKPOINT, PAUSE_ENV, load_checkpoint, save_checkpoint
from dropless.errors import DroplessError
from dropless.train import resume_config, train


def test_round_trip_and_no_temp_files(tmp_path):
    state = {"step": 3, "w": torch.arange(5.0), "nested": {"s": "x", "none": None}}
    save_checkpoint(tmp_path / CHECKPOINT, state)
    save_checkpoint(tmp_path / CHECKPOINT, {**state, "step": 4})
    loaded = load_checkpoint(tmp_path / CHECKPOINT)
    assert loaded["step"] == 4 and torch.equal(loaded["w"], state["w"])
    assert loaded["nested"] == state["nested"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"w": torch.randn(1000)})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        middle = len(raw) // 2
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 1]) + raw[middle + 1:])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    else:
        path.write_bytes(b"")
    with pytest.raises(DroplessError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_kill_during_save_keeps_the_previous_checkpoint(small_cfg, tmp_path):
    """SIGKILL a training process while it sits between its fsynced temp file and the rename:
    the previous checkpoint must still load, and the run must resume from it."""
    cfg = small_cfg(steps=2)
    train(cfg, progress=False)
    run = Path(cfg.out)
    env = {**subprocess_env(), PAUSE_ENV: "120"}
    proc = subprocess.Popen([sys.executable, "-m", "dropless", "train", "--resume", str(run),
                             "--steps", "4", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(run.glob(f"{CHECKPOINT}.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert load_checkpoint(run / CHECKPOINT)["step"] == 2
    resumed_cfg, state = resume_config(run, {"steps": 4})
    assert train(resumed_cfg, state=state, progress=False)["step"] == 4
    assert sorted(p.name for p in run.glob(f"{CHECKPOINT}*")) == [CHECKPOINT]   # stale temp removed


def test_ctrl_c_saves_and_exits_cleanly(small_cfg, tmp_path, capsys):
    cfg = small_cfg()
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "dropless", "train", "--data", cfg.data,
                             "--cache-dir", cfg.cache_dir, "--out", cfg.out, "--steps", "100000",
                             "--batch-size", "2", "--seq-len", "16", "--log-every", "1", "--quiet",
                             "--sample-tokens", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = Path(cfg.out) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(2)   # SIGINT, as Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted at step" in out
    step = load_checkpoint(Path(cfg.out) / CHECKPOINT)["step"]
    assert step >= 2 and f"--resume {cfg.out}" in out
    assert cli.main(["train", "--resume", cfg.out, "--steps", str(step + 1), "--quiet"]) == 0
    assert "trained tiny" in capsys.readouterr().out
