"""`dropless eval` under bf16-mixed (CUDA) reads the matmul weights in bf16: the loss equals the
fp32 model's under autocast, bit for bit, in about half the memory. Checked on the CPU with CPU
autocast standing in for CUDA's, and on CUDA (gpu-marked)."""

import pytest
import torch

from dropless import evaluate
from dropless.checkpoint import load_model_dir, load_run
from dropless.convert import save_hf_dir
from dropless.optim import matmul_weights
from dropless.train import lm_loss


def _loss(model, x, y):
    with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16):
        return lm_loss(model, x, y)[0]


def _check_mixed(mixed, full):
    matmul = matmul_weights(mixed)
    assert matmul and "embed.weight" not in matmul
    for name, p in mixed.named_parameters():
        want = torch.bfloat16 if name in matmul else torch.float32
        assert p.dtype == want, (name, p.dtype)
        torch.testing.assert_close(p, dict(full.named_parameters())[name].to(want), rtol=0, atol=0)
    assert mixed.lm_head.weight is mixed.embed.weight or "lm_head.weight" in matmul
    x = torch.randint(0, full.cfg.vocab_size, (2, 33), device=full.embed.weight.device)
    assert torch.equal(_loss(mixed, x[:, :-1], x[:, 1:]), _loss(full, x[:, :-1], x[:, 1:]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_run_and_a_hf_directory_read_mixed(trained_run, tmp_path, device):
    full, tok, _ = load_run(trained_run, device)
    _check_mixed(load_run(trained_run, device, matmul_dtype=torch.bfloat16)[0], full)
    save_hf_dir(load_run(trained_run)[0], tmp_path / "hf", tok.to_json())   # from the host
    hf_full = load_model_dir(tmp_path / "hf", device)[0]
    _check_mixed(load_model_dir(tmp_path / "hf", device, matmul_dtype=torch.bfloat16)[0], hf_full)


def test_eval_under_bf16_mixed_reads_mixed_and_scores_as_fp32(trained_run, monkeypatch):
    seen = []
    real = evaluate.load_run

    def record(*args, **kwargs):
        seen.append(kwargs.get("matmul_dtype"))
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "load_run", record)
    monkeypatch.setattr(evaluate, "resolve_precision", lambda precision, device: "bf16-mixed")
    mixed = evaluate.evaluate_dir(trained_run, device="cpu")
    monkeypatch.setattr(evaluate, "load_run", lambda *a, **k: real(*a))   # fp32, autocast too
    full = evaluate.evaluate_dir(trained_run, device="cpu")
    assert seen == [torch.bfloat16]
    assert mixed["val_loss"] == full["val_loss"]
