"""The decode experts on k-major weights (gemv.decode_experts_kmajor, moe_decode.kmajor_experts)
against the training path of the MoE layer and the contiguous layout's GEMVs.

On a GPU when there is one, else on the CPU under the Triton interpreter (fp32/fp16 only)."""

import pytest
import torch

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton

from dropless import MoE, MoEConfig, Transformer, get_preset
from dropless.ops import gemv
from dropless.serve.moe_decode import kmajor_experts, moe_decode
from tests.conftest import rel_err

HERE = (DEVICE,)   # kmajor_experts on this test's device type (by default: CUDA only)


def _moe(D, F, E, K, dtype, shared=0):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, num_shared_experts=shared))
    return moe.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,F,E,K", [(1, 64, 96, 8, 2), (3, 40, 24, 4, 4), (2, 128, 64, 16, 3),
                                       (5, 48, 16, 4, 1)])
def test_kmajor_layout_matches_training_path(dtype, T, D, F, E, K):
    """Same shapes and values after the relayout, memory transposed; the decode experts on it
    (K = E included; D 40 / F 24: not a multiple of the blocks, masked) give the training path's
    output, with and without the residual, and the contiguous layout's GEMVs' output."""
    moe = _moe(D, F, E, K, dtype, shared=1)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    residual = torch.randn(T, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref, _ = moe(x)
        contiguous = moe_decode(moe, x, "triton", residual=residual)
        before = [p.clone() for p in (moe.experts.gate_up, moe.experts.down)]
        storage = [p.data_ptr() for p in (moe.experts.gate_up, moe.experts.down)]
        assert kmajor_experts(moe, HERE) == 2 and kmajor_experts(moe, HERE) == 0   # once
        after = (moe.experts.gate_up, moe.experts.down)
        assert all(gemv.kmajor(p) and not p.is_contiguous() for p in after)
        assert [p.data_ptr() for p in after] == storage   # relaid in place, expert by expert
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        out = moe_decode(moe, x, "triton")
        out_res = moe_decode(moe, x, "triton", residual=residual)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert rel_err(out_res, ref + residual) < TOL[dtype]
    assert rel_err(out_res, contiguous) < TOL[dtype]


@pytest.mark.parametrize("tiles", [{"gate_up": (4, 32, 4), "down": (8, 16, 2)},
                                   {"gate_up": (1, 8, 1), "down": (2, 64, 4)}])
def test_kmajor_tiles_that_do_not_divide_the_shapes(tiles):
    """Wider tiles than the defaults, F 24 and D 40 divided by none of them: masked columns and
    reductions; every token on one expert, and an expert no token uses."""
    D, F, E, K, T = 40, 24, 4, 2, 3
    moe = _moe(D, F, E, K, torch.float32)
    gu, dn = moe.experts.gate_up.data, moe.experts.down.data
    gu_k = gu.transpose(1, 2).contiguous().transpose(1, 2)
    dn_k = dn.transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(T, D, device=DEVICE)
    ids = torch.tensor([[2, 0]] * T, device=DEVICE)   # expert 0 and 2 only; 0 in every token
    w = torch.rand(T, K, device=DEVICE)
    res = torch.randn(T, D, device=DEVICE)
    out = gemv.decode_experts_kmajor(x, ids, w, gu_k, dn_k, res, tiles=tiles)
    h = [torch.nn.functional.silu(x @ gu[e, :, :F]) * (x @ gu[e, :, F:]) @ dn[e] for e in range(E)]
    ref = res + sum(w[:, k, None] * torch.stack([h[e][t] for t, e in enumerate(ids[:, k].tolist())])
                    for k in range(K))
    assert rel_err(out, ref) < TOL[torch.float32]


def test_kmajor_no_tokens_and_one_token():
    moe = _moe(64, 32, 4, 2, torch.float32)
    kmajor_experts(moe, HERE)
    with torch.no_grad():
        res = torch.randn(1, 64, device=DEVICE)
        assert torch.equal(moe_decode(moe, res[:0], "triton", residual=res[:0]), res[:0])
        one = moe_decode(moe, res, "triton")
        ref, _ = moe(res)
    assert one.shape == (1, 64) and rel_err(one, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_every_path_reads_kmajor_weights(dtype):
    """A model laid out k-major computes what it computed before: the forward's grouped experts
    (bf16 on a GPU: torch._grouped_mm), and in fp32 the same greedy tokens through the engine's
    prefill, decode paths and combine. On the CPU by default nothing moves (the GEMVs it is for
    run on CUDA)."""
    from dropless.generate import generate
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).to(DEVICE, dtype).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [7, 8]]
    tokens = torch.tensor([prompts[0] * 4], device=DEVICE)
    with torch.no_grad():
        logits = model(tokens)[0]
    before = generate(model, prompts, 6, temperature=0)
    expected = 2 * len(list(model.moe_layers()))
    assert expected > 0 and kmajor_experts(model, ("cuda",)) == (expected if DEVICE == "cuda" else 0)
    assert kmajor_experts(model, HERE) == (0 if DEVICE == "cuda" else expected)
    with torch.no_grad():
        assert rel_err(model(tokens)[0], logits) < TOL[dtype]
    if dtype == torch.float32:   # bf16: h rounds where the contiguous path keeps fp32 partials
        assert generate(model, prompts, 6, temperature=0) == before


def test_compiled_prefill_on_kmajor_weights(caplog):
    """`dropless serve` compiles the prefill forward on CUDA by default, and its weights are
    k-major there: the compiled forward takes the strided weights (no failure, which the engine
    would report and run eagerly) and gives the eager engine's tokens on the training layout."""
    from dropless.serve.engine import Engine
    from dropless.serve.request import Request, SamplingParams
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).to(DEVICE).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7] * 3, [9, 8], [5] * 13]
    outputs = []
    for compiled in (False, True):
        if compiled:
            kmajor_experts(model, HERE)
        engine = Engine(model, max_batch=4, max_len=64, compile_prefill=compiled,
                        prefill_step_tokens=0)
        with caplog.at_level("WARNING", logger="dropless.serve"):
            engine.warm_up()
        requests = [engine.submit(Request(p, SamplingParams(max_tokens=4, temperature=0)))
                    for p in prompts]
        engine.run_until_done()
        outputs.append([r.output for r in requests])
        assert engine.compiled == compiled, caplog.text
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 6, 6), (3, 1, 7), (2, 7, 1)])
def test_relayout_in_place_keeps_values_and_memory(shape):
    """kmajor_experts' relayout of a contiguous tensor in its own memory: the same values at the
    same indices, k-major strides, the same storage (E = 1, square and single-row or -column
    experts, where the transposed block is itself contiguous)."""
    from dropless.serve.moe_decode import _transposed_in_place
    w = torch.randn(*shape)
    ref, ptr = w.clone(), w.data_ptr()
    out = _transposed_in_place(w)
    assert out.shape == ref.shape and torch.equal(out, ref) and gemv.kmajor(out)
    assert out.data_ptr() == ptr and out.untyped_storage().nbytes() == ref.numel() * 4
