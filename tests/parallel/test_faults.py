"""Faults under torchrun: a rank killed mid-training (with --max-restarts 1) restarts the job from
the last complete checkpoint, and the final parameters equal an uninterrupted run's, bitwise."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dropless.checkpoint import config_from_dict
from dropless.model import Transformer
from dropless.parallel import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def torchrun(out: Path, corpus: Path, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "dropless", "train", "--ep", "2",
           "--data", str(corpus), "--cache-dir", str(cache), "--steps", "16", "--batch-size", "4",
           "--seq-len", "32", "--warmup", "2", "--eval-every", "100", "--eval-batches", "1",
           "--ckpt-every", "5", "--log-every", "1", "--sample-tokens", "0", "--quiet",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True)
    log = open(out.parent / f"{out.name}.log", "w")   # a file, not a pipe: a full pipe would block
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def log_tail(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


def stop(job: subprocess.Popen) -> None:
    if job.poll() is None:   # a failed test must not leave the job running
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return len(lines)


def final_params(run_dir: Path) -> dict:
    path = ckpt.latest(run_dir)
    assert path.name == "step-00000016"
    model = Transformer(config_from_dict(ckpt.read_extra(path)["model_config"]))
    ckpt.load(path, model)
    return model.state_dict()


@pytest.mark.timeout(300)
def test_killed_rank_restarts_from_last_checkpoint(tmp_path, corpus):
    cache = tmp_path / "cache"
    straight = torchrun(tmp_path / "straight", corpus, cache)
    try:
        assert straight.wait(timeout=200) == 0, log_tail(tmp_path / "straight")
    finally:
        stop(straight)

    job = torchrun(tmp_path / "killed", corpus, cache)
    try:
        # step 6 logged => the step-5 checkpoint is complete; kill one worker before the run ends
        while last_logged_step(tmp_path / "killed") < 6:
            assert job.poll() is None, log_tail(tmp_path / "killed")
            time.sleep(0.02)
        os.kill(children(job.pid)[-1], signal.SIGKILL)
        assert job.wait(timeout=200) == 0, log_tail(tmp_path / "killed")
    finally:
        stop(job)
    assert "restart" in log_tail(tmp_path / "killed").lower()
    assert last_logged_step(tmp_path / "killed") == 16

    expected, got = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
