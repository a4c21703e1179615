"""The product path on a GPU (tests marked `gpu`: skipped without CUDA; run them on the device with
`pytest -m gpu`). `dropless train` through the CLI in each precision, resume, the compiled
default, then generate and convert from the run; the layer under bf16 autocast on CUDA against
the oracle."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import oracle, rel_err, subprocess_env

from dropless import MoE, MoEConfig, ops

pytestmark = pytest.mark.gpu

STEPS = 100


def _dropless(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "OMP_NUM_THREADS": "4"}
    proc = subprocess.run([sys.executable, "-m", "dropless", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in
            (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def _train(out, cache, *extra, steps=STEPS):
    return _dropless("train", "--preset", "small", "--out", out, "--cache-dir", cache,
                     "--steps", steps, "--batch-size", 16, "--seq-len", 256, "--warmup", 20,
                     "--eval-every", 100, "--log-every", 10, "--ckpt-every", 100,
                     "--sample-tokens", 32, "--quiet", *extra)


def _train_learns(out, cache, precision) -> list[float]:
    proc = _train(out, cache, "--precision", precision, "--no-compile")
    assert f"tokens/s, {precision}" in proc.stdout and "compiled" not in proc.stdout, proc.stdout
    losses = _losses(out)
    assert len(losses) == STEPS // 10
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0]
    return losses


def test_cli_train_on_cuda_fp32_learns(tmp_path, cache):
    """fp32 on CUDA: the experts take the Triton kernels (grouped_mm is bf16-only there)."""
    _train_learns(tmp_path / "run", cache, "fp32")


def test_cli_train_on_cuda_bf16_mixed_grad_accum_learns(tmp_path, cache):
    """bf16-mixed with two micro-batches: the working copies' gradients summed in fp32 (the AdamW
    kernel's fp32-gradient variant) train as one micro-batch does."""
    out = tmp_path / "run"
    proc = _train(out, cache, "--precision", "bf16-mixed", "--no-compile", "--grad-accum", 2,
                  "--batch-size", 8)
    assert "tokens/s, bf16-mixed" in proc.stdout, proc.stdout
    losses = _losses(out)
    assert len(losses) == STEPS // 10 and sum(losses[-3:]) / 3 < 0.75 * losses[0]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_cli_train_on_cuda_learns_and_resumes(tmp_path, cache, precision):
    straight = tmp_path / "straight"
    losses = _train_learns(straight, cache, precision)
    # half the steps, then resume for the rest: the same trajectory
    split = tmp_path / "split"
    _train(split, cache, "--precision", precision, "--no-compile", steps=STEPS // 2)
    _dropless("train", "--resume", split, "--steps", STEPS, "--quiet")
    resumed = _losses(split)
    assert len(resumed) == len(losses)
    # Same data and schedule, the same weights and AdamW state at the checkpoint. Two CUDA runs
    # are not bitwise equal (flash-attention's backward accumulates with atomics, and each
    # process autotunes its Triton kernels anew): measured on the H200, two straight runs drift
    # apart by ~1% of the loss by step 30 and ~2% by step 200. A resume that lost its optimizer
    # state or weights jumps back towards the initial loss (+50%), far outside 6%.
    for a, b in zip(losses, resumed):
        assert abs(a - b) < 6e-2 * abs(a), (losses, resumed)
    half = len(losses) // 2
    assert abs(sum(resumed[half:]) - sum(losses[half:])) < 3e-2 * sum(losses[half:])


def test_cli_finetune_from_hf_on_cuda(tmp_path, cache):
    """--init from a Hugging Face directory (a CUDA run converted), on the default bf16-mixed
    compiled path: the fine-tune starts where the source ended, not at a fresh model's loss."""
    run, hf, ft = tmp_path / "run", tmp_path / "hf", tmp_path / "ft"
    _train(run, cache, "--no-compile", steps=60)
    _dropless("convert", "--to-hf", run, hf)
    _dropless("train", "--init", hf, "--out", ft, "--cache-dir", cache, "--steps", 20,
              "--batch-size", 16, "--seq-len", 256, "--log-every", 10, "--eval-every", 20,
              "--sample-tokens", 0, "--quiet")
    source, tuned = _losses(run), _losses(ft)
    assert tuned[0] < 0.8 * source[0] and abs(tuned[0] - source[-1]) < 0.15 * source[-1], (
        source, tuned)


def test_cli_assistant_only_loss_on_cuda(tmp_path, cache):
    """Conversations with the loss on the assistant's turns alone, on the default compiled
    bf16-mixed path: the IGNOREd targets compile into the loss, the loss falls, and `dropless
    eval` of the run gives its last val_loss (the same covered targets)."""
    talks, run = tmp_path / "talks.jsonl", tmp_path / "run"
    talks.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is {i} plus {i}? " * 3},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(2000)))
    _train(run, cache, "--data", talks, "--assistant-only-loss", "--eval-every", 50, steps=100)
    losses, logged = _losses(run), [json.loads(line) for line in
                                    (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in logged if "val_loss" in r]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0] and val[-1] < val[0], (losses, val)
    out = _dropless("eval", run, "--json", "--cache-dir", cache, "--device", "cuda").stdout
    assert abs(json.loads(out)["val_loss"] - val[-1]) < 0.02 * val[-1], (out, val)


def test_cli_compile_generate_convert(tmp_path, cache):
    """The default on one GPU: bf16-mixed, compiled."""
    run = tmp_path / "run"
    proc = _train(run, cache, steps=60)
    assert "bf16-mixed, compiled, MFU" in proc.stdout, proc.stdout
    gen = _dropless("generate", run, "--prompt", "def ", "--max-new-tokens", 40,
                    "--device", "cuda", "--temperature", 0)
    assert gen.stdout.startswith("def ") and len(gen.stdout) > 10
    _dropless("convert", run, "--to-safetensors", tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_size > 1e6
    _dropless("convert", "--to-hf", run, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, "grouped_lowmem"),
                                             (torch.float16, "triton"),
                                             (torch.float32, "triton")])
def test_auto_never_takes_the_loop_on_cuda(monkeypatch, dtype, expected):
    monkeypatch.setattr(ops, "_reported", set())
    x = torch.randn(64, 128, device="cuda", dtype=dtype)
    w, d = torch.randn(8, 128, 512, device="cuda"), torch.randn(8, 256, 128, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a fallback report
        assert ops.resolve_backend("auto", x, w.to(dtype), d.to(dtype)) == expected


@pytest.mark.parametrize("backend", ["auto", "grouped", "grouped_lowmem", "triton"])
def test_layer_under_cuda_autocast_matches_oracle(backend):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2, z_loss_coef=1e-3,
                        num_shared_experts=1, backend=backend)).cuda()
    x = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    g = torch.randn(4, 64, 128, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a fallback report, on CUDA bf16
        with torch.autocast("cuda", torch.bfloat16):
            y, aux = moe(x)
    assert y.dtype == torch.bfloat16
    ((y.float() * g).sum() + aux.balance_loss + aux.z_loss).backward()
    y_ref, grads_ref, gx_ref, _ = oracle(moe, x, g)
    assert 1e-5 < rel_err(y, y_ref) < 2e-2
    assert rel_err(x.grad, gx_ref) < 2e-2
    for name, p in moe.named_parameters():
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, grads_ref[name]) < 3e-2, name


def test_autocast_feeds_grouped_mm_bf16_operands():
    """The experts' grouped_mm sees bf16 operands under autocast on CUDA (the loop would be hit
    otherwise): count the grouped_mm calls of one forward."""
    moe = MoE(MoEConfig(dim=128, hidden_dim=256, num_experts=8, top_k=2)).cuda()
    calls = []
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        calls.append((a.dtype, b.dtype))
        return real(a, b, offs=offs, **kw)

    torch._grouped_mm = spy
    try:
        with torch.autocast("cuda", torch.bfloat16):
            moe(torch.randn(256, 128, device="cuda"))
    finally:
        torch._grouped_mm = real
    assert calls and all(c == (torch.bfloat16, torch.bfloat16) for c in calls)


