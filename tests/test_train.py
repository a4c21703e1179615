import json
import math
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dropless.checkpoint import load_run
from dropless.parallel.checkpoint import latest_path, read_state
from dropless.config import TrainConfig
from dropless.optim import lr_at, make_optimizer
from dropless.checkpoint import resume_config
from dropless.train import train


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_learns(small_cfg):
    summary = train(small_cfg(steps=50, lr=3e-3, warmup=5, eval_every=50), progress=False)
    records = _metrics(summary["run_dir"])
    assert [r["step"] for r in records] == list(range(1, 51))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.5 * first
    assert summary["finished"] and math.isfinite(summary["val_loss"])
    assert {"lr", "tokens_per_s", "expert_load", "aux_loss"} <= set(records[0])
    load = records[-1]["expert_load"]
    assert len(load) == 4 and all(abs(sum(row) - 1) < 1e-3 for row in load)   # layers x experts
    assert "val_loss" in records[-1] and "val_loss" not in records[0]
    for name in ("loss.png", "expert_load.png", "tokenizer.json", "dcp/step-00000050/COMPLETE"):
        assert (Path(summary["run_dir"]) / name).is_file()
    assert summary["sample"].startswith("def ")


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_resume_is_bitwise_exact(small_cfg, tmp_path, precision):
    """6 steps straight == 3 steps, Ctrl-C (checkpoint), resume for the other 3; with grad accum.
    bf16-mixed: the resumed run's working copies are made from the loaded fp32 masters."""
    straight = small_cfg(out=str(tmp_path / "straight"), grad_accum=2, precision=precision)
    train(straight, progress=False)

    def ctrl_c_at_3(step, loss):
        if step == 3:
            signal.raise_signal(signal.SIGINT)   # the handler lets step 3 finish, then saves

    split = replace(straight, out=str(tmp_path / "split"))
    first = train(split, progress=False, on_step=ctrl_c_at_3)
    assert not first["finished"] and first["step"] == 3
    assert read_state(latest_path(tmp_path / "split"))["step"] == 3
    cfg, state = resume_config(tmp_path / "split", {})
    assert cfg == split
    second = train(cfg, state=state, progress=False)
    assert second["finished"]

    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "aux_loss", "lr", "grad_norm", "expert_load", "val_loss"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    model_a, _, _ = load_run(tmp_path / "straight")
    model_b, _, _ = load_run(tmp_path / "split")
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_bpe_run_stores_its_tokenizer_and_sizes_the_model(small_cfg, tmp_path):
    summary = train(small_cfg(tokenizer="bpe", vocab=400, steps=2), progress=False)
    model, tok, state = load_run(summary["run_dir"])
    assert 256 < tok.vocab_size <= 400
    assert state["model_config"]["vocab_size"] == tok.vocab_size == model.embed.num_embeddings
    assert (Path(summary["run_dir"]) / "tokenizer.json").read_text() == tok.to_json()


def test_lr_schedule():
    cfg = TrainConfig(out="x", lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(60, cfg) == 0.55                     # half-way through the cosine
    assert abs(lr_at(110, cfg) - 0.1) < 1e-12
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_embeddings():
    from dropless.config import PRESETS
    from dropless.model import Transformer

    model = Transformer(replace(PRESETS["tiny"], tie_embeddings=False))
    decay, no_decay = make_optimizer(model, TrainConfig(out="x")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] > 0
    assert "embed.weight" in exempt and "lm_head.weight" in decayed
    assert all(p.dim() == 1 for n, p in model.named_parameters() if n in exempt - {"embed.weight"})
    assert any("experts.gate_up" in n for n in decayed)
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_saved_model_config_records_the_backend_that_ran(small_cfg):
    """--backend has one source: the model config the checkpoint saves (and a resume may change)."""
    first = train(small_cfg(steps=2, eval_every=2, backend="reference", sample_tokens=0),
                  progress=False)
    run = Path(first["run_dir"])
    assert read_state(latest_path(run))["model_config"]["moe"]["backend"] == "reference"
    model, _, _ = load_run(run)
    assert {moe.experts.backend for moe in model.moe_layers()} == {"reference"}
    cfg, state = resume_config(run, {"steps": 3, "backend": "grouped"})
    assert train(cfg, state=state, progress=False)["finished"]
    assert read_state(latest_path(run))["model_config"]["moe"]["backend"] == "grouped"


def test_clipping_inside_fused_adamw_equals_clip_grad_norm():
    """On CUDA the step clips through the fused AdamW's grad_scale (no separate pass over the
    gradients): same update and grad norm as clip_grad_norm_ + AdamW. Fused AdamW runs on the CPU
    too, so both paths run here, with a clip small enough to bind."""
    from dropless.config import PRESETS
    from dropless.model import Transformer
    from dropless.parallel.runtime import Runtime
    from dropless.train import lm_loss, train_step

    cfg = replace(PRESETS["tiny"], vocab_size=64)
    tcfg = TrainConfig(out="unused", preset="tiny", grad_clip=0.05, lr=1e-2)
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    batches = [(tokens[:, :-1], tokens[:, 1:])]
    results = []
    for fused, clip in ((False, tcfg.grad_clip), (True, tcfg.grad_clip), (True, 0.0)):
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = make_optimizer(model, tcfg)
        for group in opt.param_groups:
            # eps 1: the update is ~ the gradient itself, so clipping shows in it (Adam's update
            # at a small eps hardly depends on the gradients' scale)
            group["fused"], group["eps"] = fused, 1.0
        opt.defaults["fused"] = fused
        L, E = len(model.moe_layers()), cfg.moe.num_experts
        norm = None
        for _ in range(2):
            _, _, norm, _ = train_step(model, lm_loss, opt, batches, torch.autocast("cpu", enabled=False),
                                       replace(tcfg, grad_clip=clip),
                                       Runtime(device=torch.device("cpu")), L, E)
        results.append((norm, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (norm_a, params_a), (norm_b, params_b), (_, params_unclipped) = results
    assert norm_a > 10 * tcfg.grad_clip   # the clip binds
    torch.testing.assert_close(norm_b, norm_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(params_b, params_a, rtol=1e-5, atol=1e-7)
    assert (params_unclipped - params_a).abs().max() > 100 * (params_b - params_a).abs().max()
