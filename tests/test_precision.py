"""Mixed precision and the choice of expert backend: bf16 autocast over fp32 weights (the GPU
default of `dropless train`, reproduced on CPU), pure bf16, fallbacks reported, torch.compile."""

import contextlib
import copy
import dataclasses
import json
import warnings

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from conftest import oracle, rel_err

from dropless import MoE, MoEConfig, ops
from dropless.parallel import checkpoint as ckpt
from dropless.config import PRESETS
from dropless.model import Transformer
from dropless.precision import resolve_compile
from dropless.train import lm_loss, train

BACKENDS = ["reference", "grouped", "grouped_lowmem"]
CASES = {
    "basic": dict(),
    "k_equals_e": dict(num_experts=4, top_k=4),
    "many_empty_experts": dict(num_experts=32, top_k=1),
    "shared_gate": dict(num_shared_experts=1, shared_gate=True),
    "sigmoid_groups": dict(score_func="sigmoid", bias_update_rate=1e-2, num_groups=4,
                           topk_groups=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_autocast_bf16_computes_in_bf16_against_the_fp32_oracle(backend, case):
    """fp32 weights, bf16 autocast: outputs and gradients within bf16 tolerance of the float64
    loop, gradients in fp32 for the fp32 weights, router weights in fp32. The error must also be
    above fp32's: the experts really ran in bf16, not silently in fp32."""
    torch.manual_seed(0)
    kw = dict(dim=32, hidden_dim=64, num_experts=8, top_k=2, z_loss_coef=1e-3, backend=backend)
    moe = MoE(MoEConfig(**{**kw, **CASES[case]}))
    x = torch.randn(4, 9, 32, requires_grad=True)
    g = torch.randn(4, 9, 32)
    with torch.autocast("cpu", torch.bfloat16):
        route = moe.router(x.reshape(-1, 32))
        y, aux = moe(x)
    assert route.weights_TK.dtype == torch.float32   # the layer contract, also under autocast
    assert y.dtype == torch.bfloat16                 # as F.linear under autocast
    ((y.float() * g).sum() + aux.balance_loss + aux.z_loss).backward()
    y_ref, grads_ref, gx_ref, _ = oracle(moe, x, g)
    assert 1e-5 < rel_err(y, y_ref) < 2e-2
    assert x.grad.dtype == torch.float32 and rel_err(x.grad, gx_ref) < 2e-2
    for name, p in moe.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, grads_ref[name]) < 3e-2, name


def test_pure_bf16_layer_matches_autocast():
    """bf16 weights without autocast compute the same products as fp32 weights under autocast
    (the weights are rounded to bf16 either way); the router's fp32 logits differ only by its
    weight's rounding."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=32, hidden_dim=64, num_experts=8, top_k=2))
    x = torch.randn(64, 32)
    with torch.autocast("cpu", torch.bfloat16):
        y_mixed, _ = moe(x)
    pure = copy.deepcopy(moe).to(torch.bfloat16)
    y_pure, _ = pure(x.to(torch.bfloat16))
    assert rel_err(y_pure, y_mixed) < 1e-2


@pytest.fixture
def fresh_reports(monkeypatch):
    monkeypatch.setattr(ops, "_reported", set())


def test_fallback_is_reported_once_naming_backend_reason_and_replacement(fresh_reports):
    moe = MoE(MoEConfig(dim=16, hidden_dim=32, num_experts=4, top_k=2, backend="grouped")).double()
    x = torch.randn(8, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning) as record:
        moe(x)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert "'grouped'" in messages[0] and "float64" in messages[0] and "reference" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe(x)   # reported once: a second call is silent


def test_auto_resolves_to_grouped_for_every_cpu_training_dtype(fresh_reports):
    w = torch.empty(4, 16, 64)
    d = torch.empty(4, 32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no fallback, so no warning
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.empty(8, 16, dtype=dtype)
            assert ops.resolve_backend("auto", x, w.to(dtype), d.to(dtype)) == "grouped"
            with torch.autocast("cpu", torch.bfloat16):
                xc, wc, dc = ops.cast_operands(x, w, d)
            assert xc.dtype == wc.dtype == dc.dtype == torch.bfloat16
            assert ops.resolve_backend("auto", xc, wc, dc) == "grouped"


def test_unsupported_grouped_reasons():
    from dropless.ops import grouped

    w, d = torch.empty(4, 16, 64), torch.empty(4, 32, 16)
    assert grouped.unsupported(torch.empty(8, 16), w, d) is None
    assert "float64" in grouped.unsupported(torch.empty(8, 16, dtype=torch.float64), w, d)
    assert "dtype" in grouped.unsupported(torch.empty(8, 16, dtype=torch.bfloat16), w, d)
    assert "16 bytes" in grouped.unsupported(torch.empty(8, 3), torch.empty(4, 3, 64), d)


@pytest.mark.parametrize("backend", ["auto", "grouped_lowmem"])
def test_compiled_block_fullgraph_matches_eager(backend, monkeypatch):
    """A whole transformer block (attention + MoE with the grouped backend, or the low-memory
    one's fused dispatch, experts and combine) compiles without a graph break, in fp32, and gives
    eager's outputs and gradients."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend=backend))
    block = Transformer(cfg).layers[1]
    x = torch.randn(2, 16, cfg.dim)
    pos = torch.arange(16).expand(2, 16)
    fused, real = [], ops.grouped.fused_experts
    monkeypatch.setattr(ops.grouped, "fused_experts", lambda *a: fused.append(1) or real(*a))
    block(x, pos)
    assert bool(fused) == (backend == "grouped_lowmem")   # the path under test ran
    monkeypatch.undo()
    results = []
    for run in (block, torch.compile(copy.deepcopy(block), fullgraph=True)):
        xi = x.clone().requires_grad_(True)
        y, aux = run(xi, pos)
        (y.square().sum() + aux.balance_loss + aux.z_loss).backward()
        grads = {n.removeprefix("_orig_mod."): p.grad for n, p in run.named_parameters()}
        results.append((y, xi.grad, grads))
    (y0, gx0, g0), (y1, gx1, g1) = results
    assert rel_err(y1, y0) < 1e-5 and rel_err(gx1, gx0) < 1e-5
    assert g1.keys() == g0.keys()
    for name in g0:
        assert rel_err(g1[name], g0[name]) < 1e-4, name


@pytest.mark.parametrize("device, backend", [
    ("cpu", "auto"), pytest.param("cuda", "auto", marks=pytest.mark.gpu),
    pytest.param("cuda", "grouped_lowmem", marks=pytest.mark.gpu)])
def test_compiled_training_loss_fullgraph_matches_eager(device, backend, monkeypatch):
    """What `dropless train --compile` compiles, the model with its loss (RoPE tables made once
    for all layers, the logits' upcast inside the loss), is one graph and gives eager's loss and
    gradients; on CUDA under bf16 autocast, as the default precision runs it (the Triton and
    grouped_mm paths there asked torch.cuda for the device's capability, which split the graph
    once per MoE layer). On CUDA also with the low-memory experts, the candidate for `auto`."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend=backend))
    model = Transformer(cfg).to(device)
    if backend == "grouped_lowmem":   # the path under test runs (eagerly: dynamo traces inside)
        ran, real = [], ops.grouped.fused_experts
        monkeypatch.setattr(ops.grouped, "fused_experts", lambda *a: ran.append(1) or real(*a))
        with torch.autocast("cuda", torch.bfloat16):
            lm_loss(model, *torch.randint(0, 256, (2, 2, 17), device=device).unbind(0))
        assert ran
        monkeypatch.undo()
    x, y = torch.randint(0, 256, (2, 2, 17), device=device).unbind(0)
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    results = []
    for fn in (lm_loss, torch.compile(lm_loss, fullgraph=True)):
        model.zero_grad()
        with amp:
            loss, aux = fn(model, x, y)
        (loss + aux.balance_loss + aux.z_loss).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    tol = 1e-4 if device == "cpu" else 2e-2   # bf16 products: fused kernels round differently
    assert l0.dtype == torch.float32 and rel_err(l1, l0) < tol / 10
    for name in g0:
        assert rel_err(g1[name], g0[name]) < tol, name


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16"])
def test_train_each_precision_learns(small_cfg, precision):
    """`dropless train --precision P` on CPU: the loss falls; weights are bf16 only under 'bf16'."""
    summary = train(small_cfg(steps=30, warmup=3, eval_every=30, precision=precision,
                              sample_tokens=0), progress=False)
    assert summary["precision"] == precision
    metadata = FileSystemReader(ckpt.latest_path(summary["run_dir"])).read_metadata()
    dtype = metadata.state_dict_metadata["model.layers.0.ffn.experts.gate_up"].properties.dtype
    assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    losses = [json.loads(line)["loss"] for line in
              open(f"{summary['run_dir']}/metrics.jsonl").read().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


def test_train_compile_runs(small_cfg):
    """`dropless train --compile` runs a few steps on CPU and learns like the eager run."""
    eager = train(small_cfg(steps=4, eval_every=4, sample_tokens=0), progress=False)
    compiled = train(small_cfg(out=eager["run_dir"] + "-c", steps=4, eval_every=4,
                               sample_tokens=0, compile=True), progress=False)
    assert compiled["finished"] and compiled["compiled"] and not eager["compiled"]
    assert abs(compiled["val_loss"] - eager["val_loss"]) < 1e-3


@pytest.mark.parametrize("flag, device, world, expected", [
    (None, "cuda", 1, True), (None, "cpu", 1, False), (None, "cuda", 2, False),
    (False, "cuda", 1, False), (True, "cpu", 1, True), (True, "cuda", 4, True)])
def test_compile_default_is_on_for_one_cuda_process(flag, device, world, expected):
    assert resolve_compile(flag, torch.device(device), world) is expected


def test_cli_compile_flags_and_config_check():
    from dropless.cli_parser import build_parser
    from dropless.config import TrainConfig

    parser = build_parser()
    assert parser.parse_args(["train"]).compile is None
    assert parser.parse_args(["train", "--compile"]).compile is True
    assert parser.parse_args(["train", "--no-compile"]).compile is False
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(out="x", compile="yes")


def test_import_dropless_is_inert():
    """`import dropless` loads neither triton nor torch's compiler (importing triton before a test
    sets TRITON_INTERPRET=1 broke every interpreter-run kernel test once)."""
    import subprocess
    import sys

    code = ("import sys, dropless, dropless.ops; "
            "print([m for m in ('triton', 'torch._dynamo', 'torch._inductor') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_device_facts_are_constants_to_the_compiler():
    """ops.device marks its lookups as torch.compile does with assume_constant_result: traced,
    a marked function runs once, eagerly, and its result is a constant. An unmarked function
    that writes to stdout would break the graph (an error under fullgraph)."""
    import io
    from contextlib import redirect_stdout

    from dropless.ops.device import _constant

    calls = []

    @_constant
    def fact(index: int) -> int:
        print("looked up")   # not traceable: fullgraph fails if dynamo traces into this
        calls.append(index)
        return 3

    def f(x):
        return x * fact(0)

    with redirect_stdout(io.StringIO()):
        y = torch.compile(f, fullgraph=True)(torch.ones(2))
    assert y.tolist() == [3.0, 3.0] and calls == [0]
