"""The engine's decode step (dropless/serve/decode.py) against the model's own forward: one token
per row, rows at different positions, eager and torch.compile'd; GQA's attention prologue, its
attention and the MoE router as the torch ops (the CPU's path) and as the Triton kernels (CUDA's,
run here under the interpreter)."""

import re

import pytest
import torch

try:   # first: the interpreter must be on before triton is imported (by any test before these)
    from triton_env import DEVICE as KERNEL_DEVICE
except pytest.skip.Exception:   # no triton: the kernel cases skip
    KERNEL_DEVICE = None

from dropless import MoEConfig, Transformer
from dropless.ops import triton_linear
from dropless.quant.modules import QuantConfig, quantize_rtn
from dropless.serve import Engine, decode, moe_decode
from tests.conftest import counters_at_rest, fresh_counters, rel_err
from tests.test_mla import mla_config
from tests.test_serve_engine import tiny_model

LENGTHS = [5, 1, 9]   # tokens already in each row's cache; the step adds one more per row


def _model(kind):
    """kind: "moe" (qk-norm per head), "proj" (qk-norm over the whole projection), "mla" or
    "int4" ("moe" with int4 attention projections and experts: the stacked q|k|v and the
    residual adds inside the int4 kernels)."""
    if kind == "mla":
        torch.manual_seed(0)
        return Transformer(mla_config()).eval()
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=8, top_k=2)
    scope = "proj" if kind == "proj" else "head"
    model = tiny_model(qk_norm=True, qk_norm_scope=scope, first_dense_layers=1, moe=moe)
    return quantize_rtn(model, QuantConfig(group_size=32)) if kind == "int4" else model


@pytest.fixture
def kernels(request, monkeypatch):
    """Indirectly parametrized: "triton" runs gqa's prologue kernel on the CPU, interpreted, and
    the MoE layers choose their decode paths as on CUDA (a short prefill runs them dense);
    "triton+router" the MoE router's kernels too; "attention" the prologue and the split-KV
    attention kernel (at one token per row: prefill chunks keep SDPA); "linear" the prologue and
    the projections' GEMV kernel (norm + q|k|v, o_proj + residual; at <= 8 rows); "all" CUDA's
    whole path; "all+fused" with DROPLESS_DECODE_FUSION=1 (the sums after the router's logits,
    split-KV attention and the GEMVs' split and slot partials in those kernels' last programs)."""
    if request.param != "torch":
        if KERNEL_DEVICE != "cpu":
            pytest.skip("no interpreter with a GPU (the gpu-marked engine tests run the kernel), "
                        "or no triton")
        monkeypatch.setattr(decode, "fused_prologue", lambda q: True)
        choose = moe_decode.choose_path
        monkeypatch.setattr(moe_decode, "choose_path", lambda T, K, E, device="cpu", grouped=False:
                            choose(T, K, E, "cuda", grouped))
    everything = request.param in ("all", "all+fused")
    if request.param == "attention" or everything:
        monkeypatch.setattr(decode, "fused_attention", lambda q: True)
    if request.param == "linear" or everything:   # every row count a launch takes (CUDA: <= 2)
        monkeypatch.setattr(decode, "fused_linear",
                            lambda x: 1 <= x.shape[0] <= triton_linear.MAX_ROWS)
    if request.param == "triton+router" or everything:
        monkeypatch.setattr(moe_decode, "fused_router", lambda x: True)
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "1" if request.param == "all+fused" else "0")
    return request.param


KINDS = pytest.mark.parametrize("kind,kernels", [
    ("moe", "torch"), ("moe", "triton"), ("moe", "triton+router"), ("moe", "attention"),
    ("moe", "all"), ("moe", "all+fused"), ("moe", "linear"), ("proj", "torch"), ("proj", "triton"),
    ("proj", "all"), ("mla", "torch"), ("int4", "torch"), ("int4", "all"), ("int4", "all+fused")],
    indirect=["kernels"])


def _step_logits(model, compile, short=False):
    """Logits of one decode step for rows holding LENGTHS tokens, prefilled one row at a time
    through the model's blocks or (`short`) all rows as one padded batch through the decode
    step's path (several tokens per row; padding at the scratch position)."""
    torch.manual_seed(1)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n + 1,)).tolist() for n in LENGTHS]
    engine = Engine(model, max_batch=4, max_len=16, compile=compile)
    tokens = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long, device=engine.device)
    positions = torch.full_like(tokens, engine.max_len - 1)
    for slot, seq in enumerate(seqs):
        engine._set_row(slot, tokens=seq[-1], positions=len(seq) - 1)
        tokens[slot, :len(seq) - 1] = torch.tensor(seq[:-1])
        positions[slot, :len(seq) - 1] = torch.arange(len(seq) - 1)
        caches = [tuple(t[slot:slot + 1] for t in c) for c in engine.caches]
        with torch.no_grad():
            if not short:
                engine._hidden(tokens[slot:slot + 1, :len(seq) - 1],
                               positions[slot:slot + 1, :len(seq) - 1], caches)
    if short:
        with torch.no_grad():
            x = engine._prefill_forward(tokens, positions, 0, len(seqs), short=max(LENGTHS))
            last = torch.tensor(LENGTHS, device=engine.device) - 1
            prefilled = engine._logits(x[torch.arange(len(seqs), device=engine.device), last])
            ref = torch.stack([model(torch.tensor([s[:-1]], device=engine.device))[0][0, -1]
                               for s in seqs])
        assert rel_err(prefilled, ref) < (1e-5 if ref.dtype == torch.float32 else 2e-2)
    captured = {}
    logits = engine._logits
    engine._logits = lambda x: captured.setdefault("l", logits(x))
    with torch.no_grad():
        engine.decode_fn(4, True)   # bucket of 4: row 3 is an idle row at the scratch position
    return seqs, captured["l"][:len(seqs)]


@KINDS
@pytest.mark.parametrize("compile,short", [(False, False), (True, False), (False, True)])
def test_decode_step_matches_forward(kind, kernels, compile, short):
    """One token per row; with `short`, the prompts before it went through the same path, several
    tokens per row (the engine's prefill of short chunks)."""
    model = _model(kind)
    seqs, out = _step_logits(model, compile, short)
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([s]))[0][0, -1] for s in seqs])
    assert rel_err(out, ref) < 1e-5


def _bf16_matches_forward(model):
    seqs, out = _step_logits(model, False, short=True)
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([s], device=out.device))[0][0, -1] for s in seqs])
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2


@KINDS
def test_decode_step_matches_forward_bf16(kind, kernels):
    # these kernels round to bf16 (the int4 ones run wherever the interpreter is on)
    if kernels in ("triton+router", "attention", "linear", "all", "all+fused") or (
            kind == "int4" and KERNEL_DEVICE == "cpu"):
        pytest.skip("the interpreter rounds to bf16 wrongly (tests/triton_env.py); CUDA: gpu tests")
    _bf16_matches_forward(_model(kind).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "int4"])
def test_decode_step_matches_forward_bf16_on_gpu(kind):
    """CUDA's whole decode path in bf16 (the projections' GEMVs, the int4 kernels with their
    residual adds, the stacked int4 q|k|v) against the model's forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _bf16_matches_forward(_model(kind).to("cuda", torch.bfloat16))


def test_compiled_decode_equals_eager():
    model = _model("moe")
    assert torch.equal(_step_logits(model, False)[1].argmax(-1),
                       _step_logits(model, True)[1].argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "int4"])
def test_pdl_step_equals_plain_launches_on_gpu(kind, monkeypatch):
    """DROPLESS_PDL=1 (programmatic dependent launch of the decode kernels): every kernel waits
    for the one before it on entry, so the step's logits are bitwise those of plain launches;
    also with DROPLESS_PDL_PRELOAD=1 (the projections and the router load their first weights
    before that wait, and sum them in the same order)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _model(kind).to("cuda", torch.bfloat16)
    monkeypatch.setenv("DROPLESS_PDL", "0")   # whatever the environment says
    plain = _step_logits(model, False, short=True)[1]
    monkeypatch.setenv("DROPLESS_PDL", "1")
    for preload in ("0", "1"):
        monkeypatch.setenv("DROPLESS_PDL_PRELOAD", preload)
        assert torch.equal(_step_logits(model, False, short=True)[1], plain)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "int4"])
def test_decode_fusion_step_on_gpu(kind, monkeypatch):
    """DROPLESS_DECODE_FUSION=1 on CUDA, with and without PDL: the sums of the split and slot
    partials, the router's split logits and split-KV attention's chunks in the last program to
    arrive (release-acquire counters across multiprocessors, which the interpreter cannot race)
    give the separate launches' logits: the same sums in the same order, in tiles of other widths
    (bf16: within a rounding), over repeated steps that reuse the counters."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fresh_counters(monkeypatch)
    model = _model(kind).to("cuda", torch.bfloat16)
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "0")
    monkeypatch.setenv("DROPLESS_PDL", "0")
    plain = _step_logits(model, False, short=True)[1].float()
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "1")
    for pdl in ("0", "1", "1"):
        monkeypatch.setenv("DROPLESS_PDL", pdl)
        fused = _step_logits(model, False, short=True)[1].float()
        assert rel_err(fused, plain) < 1e-2 and torch.equal(fused.argmax(-1), plain.argmax(-1))
    assert counters_at_rest()


def _long_context_tokens(kind, device, fused, monkeypatch):
    """Greedy tokens of one row after a 150-token prompt, and which launchers used arrival
    counters: one row, so the experts decode by GEMV (2 T K < E), and a cache past 64 positions, so
    split-KV attention splits (the batched step tests above run neither). On the CPU the kernels
    run under the interpreter, gated on as on CUDA."""
    from dropless.generate import generate
    from dropless.ops import gemv, triton_attention, triton_router
    model = tiny_model(dim=64, max_seq_len=320, qk_norm=True,
                       moe=MoEConfig(dim=64, hidden_dim=32, num_experts=8, top_k=2))
    if kind == "int4":
        model = quantize_rtn(model, QuantConfig(group_size=32))
    model = model.to(device)
    if device == "cpu":
        monkeypatch.setattr(decode, "fused_prologue", lambda q: True)
        monkeypatch.setattr(decode, "fused_attention", lambda q: True)
        monkeypatch.setattr(decode, "fused_linear", lambda x: 1 <= x.shape[0] <= 2)
        monkeypatch.setattr(moe_decode, "fused_router", lambda x: True)
        choose = moe_decode.choose_path
        monkeypatch.setattr(moe_decode, "choose_path", lambda T, K, E, device="cpu",
                            grouped=False: choose(T, K, E, "cuda", grouped))
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", fused if isinstance(fused, str) else
                       "1" if fused else "0")
    used = set()
    for module in (gemv, triton_attention, triton_router):
        def spy(dev, n, module=module, counters=module.counters):
            used.add(module.__name__.rsplit(".", 1)[1])
            return counters(dev, n)
        monkeypatch.setattr(module, "counters", spy)
    prompt = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    return model, prompt, generate(model, [prompt], 3, temperature=0)[0], used


@pytest.mark.parametrize("kind", ["moe", "int4"])
def test_every_fusion_in_a_long_context_step(kind, monkeypatch):
    """DROPLESS_DECODE_FUSION=1 through the engine, every fused sum on the path (the experts' and
    int4 linears' partials, the router's top-k, split-KV attention's combine), against the
    model's own forward."""
    if KERNEL_DEVICE != "cpu":
        pytest.skip("the interpreter's run (CUDA: test_every_fusion_in_a_long_context_step_on_gpu)")
    from dropless.generate import greedy_recompute
    fresh_counters(monkeypatch)
    model, prompt, tokens, used = _long_context_tokens(kind, "cpu", True, monkeypatch)
    assert used == {"gemv", "triton_attention", "triton_router"} and counters_at_rest()
    assert tokens == greedy_recompute(model, prompt, 3)


@pytest.mark.parametrize("sites, launchers", [
    ("topk", {"triton_router"}), ("combine", {"triton_attention"}), ("sum", {"gemv"}),
    ("topk+combine", {"triton_router", "triton_attention"}), ("norm+prefetch", set())])
def test_fusion_sites_one_at_a_time(sites, launchers, monkeypatch):
    """DROPLESS_DECODE_FUSION=SITE[+SITE...]: only those sites fuse (the launchers that count
    arrivals are theirs alone), and the step still equals the model's forward (int4: every site
    is on its path)."""
    if KERNEL_DEVICE != "cpu":
        pytest.skip("the interpreter's run")
    from dropless.generate import greedy_recompute
    from dropless.ops import device
    fresh_counters(monkeypatch)
    model, prompt, tokens, used = _long_context_tokens("int4", "cpu", sites, monkeypatch)
    assert used == launchers and (counters_at_rest() if used else not device._counters)
    assert tokens == greedy_recompute(model, prompt, 3)


def test_fusion_sites_switch(monkeypatch):
    from dropless.ops.device import DECODE_FUSION_ENV, FUSION_SITES, decode_fusion
    monkeypatch.setenv(DECODE_FUSION_ENV, "topk+prefetch")
    assert [decode_fusion(s) for s in FUSION_SITES] == [False, True, False, False, True]
    for value, on in (("1", True), ("0", False)):
        monkeypatch.setenv(DECODE_FUSION_ENV, value)
        assert all(decode_fusion(s) is on for s in FUSION_SITES)
    monkeypatch.delenv(DECODE_FUSION_ENV)
    assert not any(decode_fusion(s) for s in FUSION_SITES)
    for bad in ("topk,combine", "topk+", "yes", "TOPK"):
        monkeypatch.setenv(DECODE_FUSION_ENV, bad)
        with pytest.raises(ValueError, match=re.escape(
                f"DROPLESS_DECODE_FUSION='{bad}' is invalid: allowed: 0, 1, or sites joined by "
                "'+' from sum, topk, combine, norm, prefetch")):
            decode_fusion("topk")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "int4"])
def test_every_fusion_in_a_long_context_step_on_gpu(kind, monkeypatch):
    """The same on CUDA (fp32: the reductions' other tiles change only roundings): the tokens of
    the separate launches, counters at rest."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fresh_counters(monkeypatch)
    plain = _long_context_tokens(kind, "cuda", False, monkeypatch)[2]
    _, _, tokens, used = _long_context_tokens(kind, "cuda", True, monkeypatch)
    assert used == {"gemv", "triton_attention", "triton_router"} and counters_at_rest()
    assert tokens == plain


def test_pdl_switch(monkeypatch):
    from dropless.ops.device import PDL_ENV, pdl_launch

    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl_launch(torch.device("cpu")) == {}   # a CUDA feature (sm_90+): never on the CPU
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match="DROPLESS_PDL='yes' is invalid: allowed: 0, 1"):
        pdl_launch(torch.device("cpu"))
    from dropless.ops import device
    monkeypatch.delenv(PDL_ENV)   # unset: on where the GPU has it (sm_90+), DROPLESS_PDL=0 off
    monkeypatch.setattr(device, "cuda_capability_major", lambda index: 9)
    cuda = torch.device("cuda", 0)
    assert pdl_launch(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("DROPLESS_PDL_PRELOAD", "1")   # only for the kernels that can preload
    assert pdl_launch(cuda, preload=True) == {"PDL": True, "launch_pdl": True, "PRELOAD": True}
    assert pdl_launch(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv(PDL_ENV, "0")
    assert pdl_launch(cuda, preload=True) == {}
    monkeypatch.setattr(device, "cuda_capability_major", lambda index: 8)
    monkeypatch.delenv(PDL_ENV)
    assert pdl_launch(cuda) == {}
