"""The int4 Triton kernels (dropless/ops/awq.py) against the dequantize-then-matmul reference.

On the CPU they run under the Triton interpreter (fp32/fp16 only: its bf16 arithmetic is wrong) at
small shapes; the gpu-marked tests run bf16 at model shapes, the MoE layer end to end, CUDA graph
capture and the custom ops' fake implementations.
"""

import pytest
import torch

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton
from test_ops_triton import routing as triton_routing

from dropless.ops import awq, gemv, reference
from dropless.quant.pack import dequantize, quantize_packed



def rel(out, ref):
    assert not torch.isnan(out).any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def packed_experts(E, D, F, group, gen):
    gate_up = torch.randn(E, D, 2 * F, generator=gen) * D ** -0.5
    down = torch.randn(E, F, D, generator=gen) * F ** -0.5
    return [t.to(DEVICE) for t in (*quantize_packed(gate_up, group), *quantize_packed(down, group))]


def routing(T, E, K, mode, gen):
    """test_ops_triton's random or skewed routing, on the test device."""
    weights, ids = triton_routing(T, E, K, mode, gen)
    return weights.to(DEVICE), ids.to(DEVICE)


def oracle(x_TD, ids_TK, weights_TK, packed):
    """float64 loop over slots with the dequantized weights (independent of the reference path)."""
    gqw, gqz, gsc, dqw, dqz, dsc = packed
    y = torch.zeros(x_TD.shape, dtype=torch.float64, device=x_TD.device)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            g, u = (x_TD[t].double() @ dequantize(gqw[e], gqz[e], gsc[e], torch.float64)).chunk(2)
            h = torch.nn.functional.silu(g) * u
            y[t] += weights_TK[t, k].double() * (h @ dequantize(dqw[e], dqz[e], dsc[e], torch.float64))
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,I,O,group", [(1, 128, 64, 128), (5, 64, 72, 32), (40, 128, 64, 64),
                                         (17, 64, 200, 64)])
@pytest.mark.parametrize("residual", [False, True])
def test_linear(M, I, O, group, dtype, residual):
    """(residual +) x @ W: the GEMV (<= 16 rows; the residual in the partials' sum) and the
    grouped kernel."""
    gen = torch.Generator().manual_seed(M * I + O)
    packed = [t.to(DEVICE) for t in quantize_packed(torch.randn(I, O, generator=gen), group)]
    x = torch.randn(M, I, generator=gen).to(DEVICE, dtype)
    res = torch.randn(M, O, generator=gen).to(DEVICE, dtype) if residual else None
    out = awq._linear_op(x, *packed, res)
    assert out.dtype == dtype and out.shape == (M, O)
    ref = x.double() @ dequantize(*packed, torch.float64)
    assert rel(out, ref if res is None else ref + res.double()) < TOL[dtype]


@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,sms", [(1, None), (1, 64), (5, 64), (17, None)])
def test_linear_with_the_norm_first(M, sms, dtype, fused, monkeypatch):
    """F.rms_norm(x, w, eps) @ W with the norm in the int4 GEMV's launch (the decode step's
    attention norm + q|k|v, DROPLESS_DECODE_FUSION): rows normalised and rounded to x's dtype as
    F.rms_norm does, with split reductions (sms 64) and without; past the GEMV's rows (17) the
    norm runs first as F.rms_norm. The torch reference path (awq_linear off the kernels) too.
    fused: the split partials summed in the GEMV's last programs (DROPLESS_DECODE_FUSION)."""
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", fused)
    if sms:
        monkeypatch.setattr(gemv, "_num_sms", lambda device: sms)
    gen = torch.Generator().manual_seed(M)
    packed = [t.to(DEVICE) for t in quantize_packed(torch.randn(256, 192, generator=gen), 64)]
    x = (3 * torch.randn(M, 256, generator=gen)).to(DEVICE, dtype)
    norm_w = (0.5 + torch.rand(256, generator=gen)).to(DEVICE, dtype)
    h = torch.nn.functional.rms_norm(x, (256,), norm_w, 1e-5)
    ref = h.double() @ dequantize(*packed, torch.float64)
    out = awq._linear_op(x, *packed, None, norm_w, 1e-5)
    assert out.dtype == dtype and rel(out, ref) < TOL[dtype]
    res = torch.randn(M, 192, generator=gen).to(DEVICE, dtype)
    out = awq._linear_op(x, *packed, res, norm_w, 1e-5)
    assert rel(out, ref + res.double()) < TOL[dtype]
    with monkeypatch.context() as m:
        m.setattr(awq, "kernels_run", lambda x: False)
        assert rel(awq.awq_linear(x, *packed, norm=(norm_w, 1e-5)), ref) < TOL[dtype]


CASES = [  # T, D, F, E, K, routing, group
    (3, 64, 64, 4, 2, "random", 64),     # decode-sized
    (1, 128, 64, 8, 1, "random", 32),    # one token, one expert
    (6, 64, 64, 4, 4, "random", 64),     # K == E
    (12, 64, 64, 8, 2, "few", 32),       # experts with zero tokens
    (24, 64, 128, 1, 1, "one", 64),      # a single expert
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,F,E,K,mode,group", CASES)
def test_moe_paths(T, D, F, E, K, mode, group, dtype):
    """decode (per slot), fused grouped (gather + scatter) and experts over dispatched rows."""
    gen = torch.Generator().manual_seed(T * 7 + E)
    packed = packed_experts(E, D, F, group, gen)
    weights, ids = routing(T, E, K, mode, gen)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    ref = oracle(x, ids, weights, packed)
    assert rel(awq._decode_op(x, ids, weights, *packed), ref) < TOL[dtype]
    res = torch.randn(T, D, generator=gen).to(DEVICE, dtype)   # added in the slot-sum kernel
    assert rel(awq._decode_op(x, ids, weights, *packed, res), ref + res.double()) < TOL[dtype]
    plan = reference.make_plan(ids, E)
    fused = awq._fused_op(x, weights, plan.slot_of_row_R, plan.counts_E, *packed)
    assert fused.dtype == dtype and rel(fused, ref) < TOL[dtype]
    rows = awq._experts_op(reference.dispatch(x, plan), plan.counts_E, *packed)
    assert rel(reference.combine(rows, plan, weights), ref) < TOL[dtype]
    # the plan-driven fused entry point picks a kernel by size; both agree with the oracle
    assert rel(awq.awq_fused_experts(x, plan, weights, *packed), ref) < TOL[dtype]


@pytest.mark.parametrize("unpack", ["interleave", "gather", "packed", "packed-small"])
def test_other_unpackings(monkeypatch, unpack):
    """The other ways of reading the int32s (DROPLESS_AWQ_UNPACK): spread over columns in
    registers or by each column's own load, instead of nibble by nibble (the default); "packed":
    the grouped kernel's tiles in packed order (DROPLESS_AWQ_GROUPED_PACKED=1), "packed-small":
    in 16-row tiles only (=small)."""
    if unpack.startswith("packed"):
        mode = "small" if unpack == "packed-small" else "1"
        monkeypatch.setenv(awq.GROUPED_PACKED_ENV, mode)
        assert [awq._grouped_packed(m) for m in (16, 64)] == [True, mode == "1"]
        for cases in CASES:
            test_moe_paths(*cases, torch.float16)
        test_linear(40, 128, 64, 64, torch.float32, residual=False)
    else:
        monkeypatch.setenv(awq.UNPACK_ENV, unpack)
    test_moe_paths(*CASES[3], torch.float32)
    test_linear(17, 64, 200, 64, torch.float16, residual=True)
    test_decode_narrow_tiles_and_split_k(monkeypatch)


@pytest.mark.parametrize("tile", ["32,32,32,4,1", "16,128,64,8,2"])
def test_grouped_tile_override(monkeypatch, tile):
    """DROPLESS_AWQ_TILE (benchmarks/awq.py --tiles) sets the grouped kernel's tile, row tiles of
    the tile map included, for the experts and the linear alike."""
    monkeypatch.setenv(awq.TILE_ENV, tile)
    assert awq._tile(1000, 1) == tuple(int(v) for v in tile.split(","))
    test_moe_paths(*CASES[3], torch.float32)
    test_linear(17, 64, 200, 64, torch.float16, residual=True)


@pytest.mark.parametrize("tile", ["32,64,64,8", "32,64,48,8,3", "a,b,c,d,e", "16,64,64,4,0"])
def test_bad_tile_is_refused(monkeypatch, tile):
    monkeypatch.setenv(awq.TILE_ENV, tile)
    with pytest.raises(ValueError, match="DROPLESS_AWQ_TILE=.* is invalid: allowed: five positive"):
        awq._tile(64, 8)


def test_the_default_packs_16_row_tiles_only(monkeypatch):
    """=small by default (round 28: faster at Qwen3's 16-row tiles, equal at Mixtral's 64);
    =0 turns it off everywhere."""
    monkeypatch.delenv(awq.GROUPED_PACKED_ENV, raising=False)
    assert [awq._grouped_packed(m) for m in (16, 32, 64)] == [True, False, False]
    monkeypatch.setenv(awq.GROUPED_PACKED_ENV, "0")
    assert not awq._grouped_packed(16)


def test_unknown_grouped_packing_is_refused(monkeypatch):
    monkeypatch.setenv(awq.GROUPED_PACKED_ENV, "yes")
    with pytest.raises(ValueError, match="DROPLESS_AWQ_GROUPED_PACKED='yes' is invalid: allowed: "
                                         "0, 1, small"):
        awq._grouped_packed(16)


def test_unknown_unpacking_is_refused(monkeypatch):
    monkeypatch.setenv(awq.UNPACK_ENV, "bogus")
    x = torch.randn(1, 64, device=DEVICE)
    packed = [t.to(DEVICE) for t in quantize_packed(torch.randn(64, 64), 64)]
    with pytest.raises(ValueError, match="DROPLESS_AWQ_UNPACK='bogus' is invalid: allowed: nibble"):
        awq._linear_op(x, *packed)


def test_decode_narrow_tiles_and_split_k(monkeypatch):
    """As on a GPU with many multiprocessors: split reductions for gate|up (SwiGLU afterwards)
    and for down."""
    monkeypatch.setattr(gemv, "_num_sms", lambda device: 64)
    gen = torch.Generator().manual_seed(5)
    packed = packed_experts(4, 256, 256, 32, gen)
    weights, ids = routing(2, 4, 2, "random", gen)
    assert gemv.gemv_split(4, 512, 256, "cpu", "int4") == 2
    assert gemv.gemv_split(4, 256, 256, "cpu", "int4") == 2
    x = torch.randn(2, 256, generator=gen).to(DEVICE)
    assert rel(awq._decode_op(x, ids, weights, *packed), oracle(x, ids, weights, packed)) < 1e-5
    # a linear's split partials summed with the residual in one kernel
    assert gemv.gemv_split(2, 512, 256, "cpu", "int4") == 2
    res = torch.randn(2, 256, generator=gen).to(DEVICE)
    lin = packed[0][0], packed[1][0], packed[2][0]   # expert 0's gate|up as one [256, 512] linear
    out = awq._linear_op(x, *lin, torch.zeros(2, 512, device=DEVICE))
    assert rel(out, x.double() @ dequantize(*lin, torch.float64)) < 1e-5
    out = awq._linear_op(x, *lin, res.repeat(1, 2))
    assert rel(out, x.double() @ dequantize(*lin, torch.float64) + res.repeat(1, 2).double()) < 1e-5


def test_reference_paths_match_oracle():
    gen = torch.Generator().manual_seed(3)
    packed = [t.cpu() for t in packed_experts(4, 64, 64, 32, gen)]
    weights, ids = routing(9, 4, 2, "few", gen)
    weights, ids = weights.cpu(), ids.cpu()
    x = torch.randn(9, 64, generator=gen, dtype=torch.float64)
    ref = oracle(x, ids, weights, packed)
    assert rel(awq.reference_decode(x, ids, weights, *packed), ref) < 1e-10
    plan = reference.make_plan(ids, 4)
    rows = awq.reference_experts(reference.dispatch(x, plan), plan.counts_E, *packed)
    assert rel(reference.combine(rows, plan, weights), ref) < 1e-10


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T,D,F,E,K", [(1, 2048, 768, 128, 8), (64, 2048, 768, 128, 8),
                                       (1, 4096, 1024, 8, 2), (200, 1024, 512, 16, 2)])
def test_moe_bf16_model_shapes(T, D, F, E, K):
    gen = torch.Generator().manual_seed(T)
    packed = packed_experts(E, D, F, 128, gen)
    weights, ids = routing(T, E, K, "random", gen)
    x = torch.randn(T, D, generator=gen).to(DEVICE, torch.bfloat16)
    plan = reference.make_plan(ids, E)
    ref = awq.reference_decode(x.float(), ids, weights, *packed).double()
    for out in (awq._decode_op(x, ids, weights, *packed),
                awq._fused_op(x, weights, plan.slot_of_row_R, plan.counts_E, *packed)):
        assert rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_cuda_graph_and_fake():
    gen = torch.Generator().manual_seed(0)
    packed = packed_experts(16, 256, 128, 128, gen)
    weights, ids = routing(2, 16, 2, "random", gen)
    x = torch.randn(2, 256, generator=gen).to(DEVICE, torch.bfloat16)
    eager = awq._decode_op(x, ids, weights, *packed)
    graph = torch.cuda.CUDAGraph()
    awq._decode_op(x, ids, weights, *packed)   # warm-up compiles the kernels outside the capture
    with torch.cuda.graph(graph):
        captured = awq._decode_op(x, ids, weights, *packed)
    graph.replay()
    assert torch.equal(captured, eager)
    lin = [t.to(DEVICE) for t in quantize_packed(torch.randn(256, 128, generator=gen), 128)]
    torch.library.opcheck(awq._linear_op, (x, *lin))
    torch.library.opcheck(awq._linear_op, (x, *lin, torch.randn(2, 128, device=DEVICE,
                                                                dtype=x.dtype)))
    torch.library.opcheck(awq._decode_op, (x, ids, weights, *packed))
    torch.library.opcheck(awq._decode_op, (x, ids, weights, *packed, torch.randn_like(x)))
    compiled = torch.compile(lambda a: awq._decode_op(a, ids, weights, *packed), fullgraph=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("T", [3, 40])   # the layer's decode path (no plan), then the grouped one
def test_moe_layer_with_int4_experts(T):
    from dropless import MoE, MoEConfig
    from dropless.quant.modules import QuantizedExperts
    from dropless.serve.moe_decode import moe_decode

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=4, top_k=2)).to(DEVICE)
    q = QuantizedExperts(4, 64, 64, 64, device=DEVICE)
    q.gate_up.set_from(moe.experts.gate_up.detach())
    q.down.set_from(moe.experts.down.detach())
    assert q.decodes(torch.zeros(T, 64, device=DEVICE), 2) == (T == 3)
    moe.experts.gate_up.data = q.gate_up.dequantize()
    moe.experts.down.data = q.down.dequantize()
    x = torch.randn(T, 64, device=DEVICE)
    with torch.no_grad():
        y_ref, aux_ref = moe(x)
        moe.experts = q
        y, aux = moe(x)
        # the engine's entry (no aux losses; the residual added): per slot, or past a slot per
        # expert the grouped kernels, which read each expert once
        res = torch.randn(T, 64, device=DEVICE)
        y_engine = moe_decode(moe, x, residual=res)
    assert rel(y, y_ref) < 1e-5 and rel(y_engine, y_ref + res) < 1e-5
    assert torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert) and aux.dropped == 0


def test_int4_decode_with_a_capacity_factor():
    """moe_decode of an int4 layer with a capacity factor, past one slot per expert: its plan
    would drop slots (the grouped kernels take dropless plans only), so every slot decodes, as
    in a layer without one."""
    from dropless import MoE, MoEConfig
    from dropless.quant.modules import QuantizedExperts
    from dropless.serve.moe_decode import moe_decode

    layers = []
    for capacity in (None, 1.25):
        torch.manual_seed(0)
        moe = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=4, top_k=2,
                            capacity_factor=capacity)).to(DEVICE)
        q = QuantizedExperts(4, 64, 64, 64, device=DEVICE)
        q.gate_up.set_from(moe.experts.gate_up.detach())
        q.down.set_from(moe.experts.down.detach())
        moe.experts = q
        layers.append(moe)
    x = torch.randn(40, 64, device=DEVICE)
    with torch.no_grad():
        plain, capped = (moe_decode(m, x) for m in layers)
    assert not layers[1].dispatcher.fusable and rel(capped, plain) < 1e-6
