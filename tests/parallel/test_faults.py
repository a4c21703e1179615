"""Faults under torchrun: rank 0 killed while it saves (after every rank wrote its shards into the
temp directory, before the rename) under --max-restarts 1: the job restarts from the previous complete checkpoint,
losing only the steps since, and the final parameters equal an uninterrupted run's, bitwise. On the
CPU (gloo): bitwise resume is a CPU promise (on CUDA, attention's backward accumulates atomically).
The launcher killed: its workers stop too, instead of training on unsupervised."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dropless.checkpoint import config_from_dict
from dropless.config import TrainConfig
from dropless.model import Transformer
from dropless.parallel import checkpoint as ckpt
from dropless.parallel.checkpoint import PAUSE_ENV
from dropless.train import train

REPO = Path(__file__).resolve().parents[2]


def torchrun(out: Path, corpus: Path, cache: Path, *flags: str, restarts: int = 1, stdout=None,
             **env_vars) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "dropless", "train", "--ep", "2", "--device", "cpu",
           "--data", str(corpus), "--cache-dir", str(cache), "--steps", "16", "--batch-size", "4",
           "--seq-len", "32", "--warmup", "2", "--eval-every", "100", "--eval-batches", "1",
           "--ckpt-every", "5", "--log-every", "1", "--sample-tokens", "0", "--quiet",
           "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_vars}
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")   # a file, not a pipe: a full pipe would block
    return subprocess.Popen(cmd, env=env, stdout=stdout or log,
                            stderr=log if stdout else subprocess.STDOUT, start_new_session=True)


def log_tail(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-3000:]


def stop(job: subprocess.Popen) -> None:
    if job.poll() is None:   # a failed test must not leave the job running
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def local_rank_0(pid: int) -> int:
    """The worker of torchrun `pid` with LOCAL_RANK=0 (it writes the manifests and renames)."""
    for child in children(pid):
        if b"LOCAL_RANK=0\0" in Path(f"/proc/{child}/environ").read_bytes():
            return child
    raise AssertionError("no worker with LOCAL_RANK=0")


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return len(lines)


def final_params(run_dir: Path) -> dict:
    path = ckpt.latest(run_dir)
    assert path.name == "step-00000016"
    model = Transformer(config_from_dict(ckpt.read_state(path)["model_config"]))
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

    job = torchrun(tmp_path / "killed", corpus, cache, **{PAUSE_ENV: "2"})
    step_10 = ckpt.step_dir(tmp_path / "killed", 10)
    tmp_10 = step_10.with_name(f".{step_10.name}.tmp")
    try:
        # the step-10 save has written its shards and manifest and waits to rename them into place
        while not (tmp_10 / ckpt.MARKER).exists():
            assert job.poll() is None, log_tail(tmp_path / "killed")
            time.sleep(0.02)
        os.kill(local_rank_0(job.pid), signal.SIGKILL)
        assert job.wait(timeout=200) == 0, log_tail(tmp_path / "killed")
    finally:
        stop(job)
    log = (tmp_path / "killed.log").read_text()
    # the restart found no step 10, resumed at step 5 and cleared the interrupted save
    assert "removing an interrupted checkpoint save" in log
    assert last_logged_step(tmp_path / "killed") == 16

    expected, got = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.timeout(200)
def test_a_restart_does_not_resume_the_run_its_first_attempt_refused(tmp_path, corpus):
    """A new run (no --resume) into an --out that already holds a run is refused; torchrun
    --max-restarts then restarts the job, and the restart must refuse it again rather than take
    the old run's checkpoint for its own and train it on."""
    out, cache = tmp_path / "old", tmp_path / "cache"
    train(TrainConfig(out=str(out), device="cpu", data=str(corpus), cache_dir=str(cache), steps=5,
                      batch_size=4, seq_len=32, warmup=2, eval_every=100, eval_batches=1,
                      ckpt_every=5, log_every=1, sample_tokens=0, ep=2), progress=False)
    job = torchrun(out, corpus, cache)
    try:
        assert job.wait(timeout=150) != 0, log_tail(out)
    finally:
        stop(job)
    log = (tmp_path / "old.log").read_text()
    assert log.count("already holds a run: pass --resume") == 2, log[-3000:]   # both attempts
    assert ckpt.latest(out).name == "step-00000005" and last_logged_step(out) == 5


@pytest.mark.timeout(120)
def test_every_rank_stops_with_one_error_line_when_rank_0_cannot_read_the_data(tmp_path, corpus):
    """Rank 0 reads --data (and fills the token cache) while the others wait; its error reaches
    them, and they stop quietly, where they failed in that wait with a gloo traceback."""
    out, missing = tmp_path / "run", tmp_path / "missing.txt"
    job = torchrun(out, corpus, tmp_path / "cache", "--data", str(missing), restarts=0)
    try:
        assert job.wait(timeout=100) != 0, log_tail(out)
    finally:
        stop(job)
    log = log_tail(out)
    assert log.count("dropless: error:") == 1 and "RuntimeError" not in log, log
    assert f"dropless: error: --data {missing}: no such file or directory" in log, log


@pytest.mark.timeout(120)
def test_a_closed_output_pipe_stops_the_job_and_rank_0_says_so(tmp_path, corpus):
    """`torchrun ... dropless train | head -1`: every rank stops after the same step, a checkpoint
    is saved, and rank 0 says on stderr how to resume; the other ranks wait for it, where they
    exited (130) at once and torchrun killed rank 0 before it had said anything."""
    out = tmp_path / "piped"
    job = torchrun(out, corpus, tmp_path / "cache", "--steps", "100000", "--eval-every", "2",
                   restarts=0, stdout=subprocess.PIPE)
    try:
        assert job.stdout.readline().startswith(b"step      2: train loss"), log_tail(out)
        job.stdout.close()   # the reader leaves
        assert job.wait(timeout=100) != 0
    finally:
        stop(job)
    step = ckpt.read_state(ckpt.latest(out))["step"]
    assert f"the output pipe closed: stopped at step {step}/100000, checkpoint saved" in \
        log_tail(out)


def _alive(pid: int) -> bool:
    try:   # a zombie (exited, not yet reaped by whoever adopted it) counts as stopped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill_launcher(job: subprocess.Popen, workers: list[int], seconds: float) -> None:
    """SIGKILL the launcher alone; its workers must stop within `seconds`."""
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + seconds
    while any(map(_alive, workers)):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.1)


def stop_all(job: subprocess.Popen, workers: list[int]) -> None:
    stop(job)
    for pid in filter(_alive, workers):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_workers_stop_when_the_launcher_dies(tmp_path, corpus):
    out = tmp_path / "orphans"
    job, workers = torchrun(out, corpus, tmp_path / "cache", "--steps", "100000"), []
    try:
        while last_logged_step(out) < 1:
            assert job.poll() is None, log_tail(out)
            time.sleep(0.05)
        workers = children(job.pid)
        assert len(workers) == 2
        kill_launcher(job, workers, 15)
        logged = last_logged_step(out)
        time.sleep(1)
        assert last_logged_step(out) == logged   # nobody writes the run any more
        # the worker that noticed first says why; the other may fail its next collective and
        # print a traceback after that line, so look in the whole log, not its tail
        assert "the launcher (pid" in (out.parent / f"{out.name}.log").read_text()
    finally:
        stop_all(job, workers)


@pytest.mark.timeout(120)
def test_workers_stop_when_the_launcher_dies_while_they_start(tmp_path, corpus):
    """The launcher killed while its workers still import torch (before the watchdog starts): by
    then their parent is the process that adopted them, and the watchdog used to watch that one,
    so they waited for the dead launcher's rendezvous for its 30-minute timeout."""
    out = tmp_path / "early"
    job, workers = torchrun(out, corpus, tmp_path / "cache", restarts=0), []
    try:
        while len(workers) < 2 or not all(b"libtorch" in Path(f"/proc/{w}/maps").read_bytes()
                                          for w in workers):   # dropless imported, torch loading
            assert job.poll() is None, log_tail(out)
            workers = children(job.pid)
            time.sleep(0.01)
        assert not (out / "dcp").exists()   # nowhere near the first step yet
        kill_launcher(job, workers, 30)
        assert "the launcher (pid" in (out.parent / f"{out.name}.log").read_text()
    finally:
        stop_all(job, workers)
