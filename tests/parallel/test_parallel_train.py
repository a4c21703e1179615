"""`train()` under a 4-rank job (dp_shard=2 x ep=2) == one process on the same global batches;
its distributed checkpoint resumes in one process and continues the same trajectory. CPU (gloo) only:
the assertions are fp32-exact, and training on a GPU runs bf16 autocast (the world-2 GPU training
runs are benchmarks: BENCHMARKS.md)."""

import fcntl
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from _dist import launch
from dropless import cli
from dropless.checkpoint import config_from_dict, load_run
from dropless.config import TrainConfig
from dropless.errors import DroplessError
from dropless.model import Transformer
from dropless.parallel import checkpoint as ckpt
from dropless.runlog import request_stop
from dropless.checkpoint import resume_config
from dropless.train import train

# fp32: losses agree to ~1e-7; the gradient norm, a norm of sums reduced in another order, drifts
# a little more over the steps
TOL = {"loss": 1e-5, "aux_loss": 1e-5, "val_loss": 1e-5, "grad_norm": 1e-4}


def train_body(rank, world, cfg, sample_file=None):
    summary = train(TrainConfig(**cfg), progress=False)
    if sample_file is not None and rank == 0:
        Path(sample_file).write_text(summary["sample"])


def metrics(run_dir) -> dict[int, dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def assert_close(a: dict, b: dict, steps):
    for step in steps:
        for key, tol in TOL.items():
            if key in a[step] or key in b[step]:
                x, y = a[step][key], b[step][key]
                assert abs(x - y) <= tol * abs(y), (step, key, x, y)
        assert a[step]["expert_load"] == b[step]["expert_load"], step


@pytest.mark.timeout(240)
def test_four_ranks_match_one_process_and_resume_elastically(tmp_path, corpus):
    base = dict(device="cpu", data=str(corpus), cache_dir=str(tmp_path / "cache"), steps=10, batch_size=4,
                seq_len=32, warmup=2, eval_every=5, eval_batches=2, ckpt_every=5, log_every=1,
                sample_tokens=16)
    launch(4, train_body, asdict(TrainConfig(out=str(tmp_path / "four"), ep=2, dp_shard=2, **base)),
           str(tmp_path / "sample"))
    single_summary = train(TrainConfig(out=str(tmp_path / "one"), **base), progress=False)
    # rank 0 samples from the gathered weights: the one process's sample (same weights, seed)
    assert (tmp_path / "sample").read_text() == single_summary["sample"]
    assert len(single_summary["sample"]) > len("def ")
    one, four = metrics(tmp_path / "one"), metrics(tmp_path / "four")
    assert sorted(four) == list(range(1, 11))
    assert_close(four, one, range(1, 11))
    # final parameters: the 4-rank checkpoint gathered into one process vs the 1-process run
    sharded = Transformer(config_from_dict(ckpt.read_state(ckpt.latest(tmp_path / "four"))["model_config"]))
    ckpt.load(ckpt.latest(tmp_path / "four"), sharded)
    single = load_run(tmp_path / "one")[0]
    for (name, p), q in zip(sharded.state_dict().items(), single.state_dict().values()):
        assert (p - q).norm() <= 1e-4 * q.norm(), name

    # the 4-rank run's step-5 checkpoint resumed in one process continues the same trajectory
    shutil.copytree(tmp_path / "four", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "dcp" / "step-00000010")
    cfg, state = resume_config(tmp_path / "resumed", {})
    assert state["step"] == 5 and cfg.ep == 2
    assert train(cfg, state=state, progress=False)["finished"]
    assert_close(metrics(tmp_path / "resumed"), four, range(6, 11))


def fused_train_body(rank, world, cfg, count_file):
    """train_body, counting the calls of the fused low-memory experts on this rank."""
    from dropless.ops import grouped
    calls, real = [], grouped.fused_experts
    grouped.fused_experts = lambda *a: calls.append(1) or real(*a)
    try:
        train(TrainConfig(**cfg), progress=False)
    finally:
        grouped.fused_experts = real
    Path(count_file).with_suffix(f".{rank}").write_text(str(len(calls)))


@pytest.mark.timeout(180)
def test_fsdp_with_the_low_memory_experts_matches_one_process(tmp_path, corpus):
    """FSDP-2 without expert parallelism keeps the local dispatcher, so the fused low-memory
    experts (`auto`'s choice for bf16 on CUDA) gather and combine by themselves on each rank,
    over parameters that FSDP unshards for the forward and reshards after backward: the losses
    and the final weights equal one process's, which runs the unfused `grouped` steps."""
    base = dict(device="cpu", data=str(corpus), cache_dir=str(tmp_path / "cache"), steps=6,
                batch_size=4, seq_len=32, warmup=2, eval_every=3, eval_batches=2, ckpt_every=6,
                log_every=1, sample_tokens=0)
    launch(2, fused_train_body, asdict(TrainConfig(out=str(tmp_path / "fsdp"), dp_shard=2,
                                                   backend="grouped_lowmem", **base)),
           str(tmp_path / "fused_calls"))
    for rank in range(2):   # the path under test ran on every rank
        assert int((tmp_path / "fused_calls").with_suffix(f".{rank}").read_text()) > 0
    train(TrainConfig(out=str(tmp_path / "one"), backend="grouped", **base), progress=False)
    one, fsdp = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert sorted(fsdp) == list(range(1, 7))
    assert_close(fsdp, one, range(1, 7))
    sharded = Transformer(config_from_dict(
        ckpt.read_state(ckpt.latest(tmp_path / "fsdp"))["model_config"]))
    ckpt.load(ckpt.latest(tmp_path / "fsdp"), sharded)
    single = load_run(tmp_path / "one")[0]
    for (name, p), q in zip(sharded.state_dict().items(), single.state_dict().values()):
        assert (p - q).norm() <= 1e-4 * q.norm(), name


def refused_body(rank, world, cfg):
    with pytest.raises(DroplessError) as refusal:
        train(TrainConfig(**cfg), progress=False)
    expected = "is in use by another dropless process" if rank == 0 else "rank 0 refused --out"
    assert expected in str(refusal.value), (rank, str(refusal.value))


@pytest.mark.timeout(120)
def test_every_rank_stops_with_one_error_when_rank_0_cannot_claim_the_run(tmp_path, corpus):
    """A second job on a run directory in use: rank 0's refusal reaches the other ranks, which
    stop with a DroplessError of their own instead of waiting in a collective for a rank that has
    exited (a gloo traceback, or a hang until the timeout)."""
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as lock:   # another dropless process holds the run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        launch(2, refused_body, asdict(TrainConfig(
            out=str(out), device="cpu", data=str(corpus), cache_dir=str(tmp_path / "cache"),
            steps=2, batch_size=4, seq_len=32, sample_tokens=0)))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]   # nothing written by either job


def cli_body(rank, world, argv, code):
    assert cli.main(argv) == code


@pytest.mark.timeout(120)
def test_resume_in_another_layout_takes_the_flags_given_whole(tmp_path, corpus):
    """A run trained with --ep 2 resumed on the same 2 ranks with --dp-shard 2 continues as FSDP-2:
    the layout flags left out take their defaults, not the run's (ep 2 x dp_shard 2 needs 4 ranks,
    and the resume was refused as an invalid layout)."""
    out = str(tmp_path / "run")
    flags = ["--device", "cpu", "--data", str(corpus), "--cache-dir", str(tmp_path / "cache"),
             "--batch-size", "4", "--seq-len", "32", "--eval-every", "100", "--ckpt-every", "100",
             "--log-every", "1", "--sample-tokens", "0", "--quiet"]
    launch(2, cli_body, ["train", "--ep", "2", "--steps", "2", "--out", out, *flags], 0)
    launch(2, cli_body, ["train", "--resume", out, "--dp-shard", "2", "--steps", "4", *flags], 0)
    saved = ckpt.read_state(ckpt.latest(out))["train_config"]
    assert (saved["ep"], saved["dp_shard"], saved["dp_replicate"]) == (1, 2, 1)
    assert sorted(metrics(out)) == [1, 2, 3, 4]


def stop_on_rank_0_body(rank, world, cfg):
    def on_step(step, loss):   # as the output pipe closing under rank 0's log line at step 3
        if rank == 0 and step == 3:
            request_stop()
    summary = train(TrainConfig(**cfg), progress=False, on_step=on_step)
    assert (summary["finished"], summary["step"]) == (False, 3), (rank, summary["step"])


@pytest.mark.timeout(120)
def test_a_stop_requested_on_one_rank_after_a_step_stops_every_rank_together(tmp_path, corpus):
    """A stop that rank 0 alone sees after the ranks agreed on the step's stop flag (its output
    pipe closed while it logged): every rank stops after the same step and they write one
    checkpoint together; rank 0 used to leave the loop alone and save while the others went on
    into the next step's collectives (a hang until the collective timeout)."""
    out = tmp_path / "run"
    launch(2, stop_on_rank_0_body, asdict(TrainConfig(
        out=str(out), device="cpu", data=str(corpus), cache_dir=str(tmp_path / "cache"), ep=2,
        steps=8, batch_size=4, seq_len=32, eval_every=100, ckpt_every=100, sample_tokens=0)))
    assert ckpt.latest(out).name == "step-00000003"


def test_no_sample_when_the_whole_model_does_not_fit_rank_0s_gpu(monkeypatch):
    """The end-of-run sample under torchrun gathers the whole model onto rank 0's GPU, beside its
    training state: it is left out (with a warning) when that does not fit, not an OOM there."""
    import torch

    from dropless.config import PRESETS
    from dropless.parallel import whole_fits

    model = Transformer(PRESETS["tiny"])
    need = sum(p.numel() for p in model.parameters()) * 2
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (need, 80 * need))
    assert whole_fits(model, cuda, torch.bfloat16) == (False, need)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * need, 80 * need))
    assert whole_fits(model, cuda, torch.bfloat16) == (True, need)
    assert whole_fits(model, torch.device("cpu"), torch.float32) == (True, 2 * need)
