"""The decode step's router kernels (dropless/ops/triton_router.py) against the torch ops of
dropless/serve/moe_decode.py `route`.

On a GPU when there is one, else on the CPU under the Triton interpreter. Top-k is unsorted: per
token the SET of ids must match, and the weights matched by id. The kernels compute in float32
whatever the inputs (loading bf16 is exact; the interpreter's wrong bf16 arithmetic is in what it
writes), but bf16 is still tested on CUDA only, as the other kernels' tests do."""

import pytest
import torch

from triton_env import DEVICE, DTYPES   # first: it sets up Triton

from dropless.config import MoEConfig
from dropless.ops import triton_router
from dropless.model import RMSNorm
from dropless.ops.triton_router import norm_route_topk, route_topk
from dropless.router import Router
from dropless.serve import moe_decode
from tests.conftest import counters_at_rest, fresh_counters, rel_err

W_TOL = 1e-5   # the weights: float32 softmaxes of float32 logits summed in another order


def make_router(D, E, K, dtype, norm=True, scale=1.0, device=DEVICE, seed=0):
    torch.manual_seed(seed)
    router = Router(MoEConfig(dim=D, num_experts=E, top_k=K, norm_topk_prob=norm,
                              route_scale=scale)).to(device, dtype)
    return router.requires_grad_(False)   # decoding: no autograd


def torch_route(router, x_TD, monkeypatch):
    """The reference: route's torch ops (on CUDA too, where route would take the kernels)."""
    with monkeypatch.context() as m:
        m.setattr(moe_decode, "fused_router", lambda x: False)
        return moe_decode.route(router, x_TD)


def assert_same_routing(weights_TK, ids_TK, ref_weights_TK, ref_ids_TK):
    assert weights_TK.dtype == torch.float32 and ids_TK.dtype == torch.int64
    assert weights_TK.shape == ref_weights_TK.shape and ids_TK.shape == ref_ids_TK.shape
    ids_sorted, order = ids_TK.sort(-1)
    ref_sorted, ref_order = ref_ids_TK.sort(-1)
    assert torch.equal(ids_sorted, ref_sorted)
    assert rel_err(weights_TK.gather(1, order), ref_weights_TK.gather(1, ref_order)) < W_TOL


def check_route(T, D, E, K, dtype, monkeypatch, norms=(True, False), scales=(1.0, 2.5)):
    x_TD = torch.randn(T, D, device=DEVICE, dtype=dtype)
    for norm in norms:
        for scale in scales:
            router = make_router(D, E, K, dtype, norm, scale)
            out = route_topk(x_TD, router.weight, K, norm, scale)
            assert_same_routing(*out, *torch_route(router, x_TD, monkeypatch))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 96])   # 96: not a multiple of the block
@pytest.mark.parametrize("E,K", [(8, 1), (8, 2), (8, 8), (60, 1), (60, 2), (60, 8), (60, 60),
                                 (128, 1), (128, 8), (128, 128)])
@pytest.mark.parametrize("T", [1, 3, 33])
def test_route_topk_matches_torch_ops(T, E, K, D, dtype, monkeypatch):
    check_route(T, D, E, K, dtype, monkeypatch)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_route_topk_split_d_as_on_a_gpu(T, fused, monkeypatch):
    """The logits grid as laid out for 132 multiprocessors: at T = 1 the experts' blocks shrink to
    one and D is split into partials that the top-k kernel sums (D not a multiple of the block);
    fused: that sum and the top-k in the logits kernel's last program (DROPLESS_DECODE_FUSION)."""
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "1" if fused else "0")
    monkeypatch.setattr(triton_router, "_num_sms", lambda device: 132)
    block_t, block_e, block_d, d_split = triton_router.logits_tiles(T, 128, 1000, 132)
    assert block_e == 1 and d_split < 1000
    check_route(T, 1000, 128, 8, torch.float32, monkeypatch, scales=(1.0,))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_route_topk_preloaded_first_step(T, fused, monkeypatch):
    """PRELOAD: each program's first step of router weights read before the PDL wait (split D
    as on a GPU, D not a multiple of the block; unsplit), with the norm folded in or not."""
    from tests.test_ops_triton_linear import preload
    asked = preload(monkeypatch, triton_router)
    monkeypatch.setenv("DROPLESS_DECODE_FUSION", "1" if fused else "0")
    check_route(T, 96, 60, 8, torch.float32, monkeypatch, scales=(1.0,))
    monkeypatch.setattr(triton_router, "_num_sms", lambda device: 132)
    check_route(T, 1000, 128, 8, torch.float32, monkeypatch, scales=(1.0,))
    x_TD = torch.randn(T, 1000, device=DEVICE)
    norm_w = torch.rand(1000, device=DEVICE) + 0.5
    router = make_router(1000, 128, 8, torch.float32)
    weights_TK, ids_TK, h_TD = norm_route_topk(x_TD, norm_w, 1e-6, router.weight, 8, True, 1.0)
    h_ref = torch.nn.functional.rms_norm(x_TD, (1000,), norm_w, 1e-6)
    assert rel_err(h_TD, h_ref) < 1e-6
    assert_same_routing(weights_TK, ids_TK, *torch_route(router, h_TD, monkeypatch))
    # the logits launches asked for it; the top-k launch (no weights of its own) did not
    assert any(options.get("PRELOAD") for options in asked)
    assert all(options.get("PRELOAD") or not fused for options in asked)


def test_route_topk_mixed_dtypes(monkeypatch):
    """x in fp16, the router weight in float32 (route upcasts x; the kernel loads both)."""
    router = make_router(64, 60, 4, torch.float32)
    x_TD = torch.randn(5, 64, device=DEVICE, dtype=torch.float16)
    out = route_topk(x_TD, router.weight, 4, True, 1.0)
    assert_same_routing(*out, *torch_route(router, x_TD, monkeypatch))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K", [(1, 2), (1, 3), (9, 2), (9, 3), (9, 4)])
def test_route_topk_all_tokens_same_experts(T, K, dtype, monkeypatch):
    """Every token's logits are largest at the same 3 experts, whose router rows are equal: exact
    ties, each id taken once. K = 3: exactly those; K = 4: those and the best of the rest; K = 2:
    any two of them (the tie crosses the cut: no set to compare with), weighted equally."""
    E, D, chosen = 16, 64, [3, 7, 12]
    router = make_router(D, E, K, dtype)
    with torch.no_grad():
        router.weight.mul_(0.1)
        router.weight[chosen] = 1.0
    x_TD = (1 + 0.1 * torch.randn(T, D, device=DEVICE)).to(dtype)
    weights_TK, ids_TK = route_topk(x_TD, router.weight, K, True, 1.0)
    in_chosen_TK = (ids_TK.unsqueeze(-1) == torch.tensor(chosen, device=DEVICE)).any(-1)
    assert in_chosen_TK.sum(-1).eq(min(K, 3)).all()
    assert all(len(set(row)) == K for row in ids_TK.tolist())
    if K >= 3:
        assert_same_routing(weights_TK, ids_TK, *torch_route(router, x_TD, monkeypatch))
    else:
        assert torch.allclose(weights_TK, torch.full_like(weights_TK, 1 / K))


@pytest.mark.parametrize("K", [2, 8])
def test_route_topk_non_finite_logits_still_give_k_distinct_experts(K):
    """Inputs with inf make logits of +-inf and NaN: the ids must still be K distinct experts in
    range (the experts' kernels read weights by them), every slot written."""
    router = make_router(64, 8, K, torch.float32)
    x_TD = torch.randn(4, 64, device=DEVICE)
    x_TD[1, 5] = float("inf")
    x_TD[2] = float("-inf")
    x_TD[3, :2] = torch.tensor([float("inf"), float("-inf")])
    ids_TK = route_topk(x_TD, router.weight, K, True, 1.0)[1]
    assert ids_TK.min() >= 0 and ids_TK.max() < 8
    assert all(len(set(row)) == K for row in ids_TK.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,E,K", [(1, 64, 8, 2), (3, 96, 60, 8), (33, 1000, 128, 8)])
def test_norm_route_topk_matches_norm_then_route(T, D, E, K, dtype, monkeypatch):
    """The MoE layer's RMSNorm folded into the logits kernel: h equals rms_norm(x) in x's dtype
    (written once, by the first expert block's programs, for every split of D) and the routing
    equals route(rms_norm(x)); a zero row normalises to 0, not NaN; D split as on a GPU."""
    monkeypatch.setattr(triton_router, "_num_sms", lambda device: 132)
    torch.manual_seed(T)
    x_TD = (3 * torch.randn(T, D, device=DEVICE)).to(dtype)
    x_TD[T - 1] = 0 if T > 1 else x_TD[T - 1]   # its logits all tie: compared as h only
    rows = slice(0, max(1, T - 1))
    norm = RMSNorm(D, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    router = make_router(D, E, K, dtype)
    weights_TK, ids_TK, h_TD = norm_route_topk(x_TD, norm.weight, norm.eps, router.weight, K,
                                               True, 1.0)
    h_ref = moe_decode.rms_norm(norm, x_TD)
    # float32 statistics summed in another order: at most a rounding of h apart in bf16/fp16
    assert h_TD.dtype == dtype and h_TD.is_contiguous() and rel_err(h_TD, h_ref) < (
        1e-6 if dtype == torch.float32 else 1e-3)
    assert_same_routing(weights_TK[rows], ids_TK[rows],
                        *torch_route(router, h_TD[rows], monkeypatch))
    monkeypatch.setattr(moe_decode, "fused_router", lambda x: True)
    assert all(torch.equal(a, b) for a, b in zip(
        moe_decode.norm_route(norm, router, x_TD), (weights_TK, ids_TK, h_TD)))


def test_route_dispatches_to_the_kernels(monkeypatch):
    """route with the gate on (as on CUDA) gives the kernels' routing, for the plain router only."""
    router = make_router(64, 60, 8, torch.float32)
    x_TD = torch.randn(3, 64, device=DEVICE)
    ref = torch_route(router, x_TD, monkeypatch)
    calls = []
    monkeypatch.setattr(moe_decode, "fused_router", lambda x: True)
    monkeypatch.setattr(moe_decode, "route_topk", lambda *a: calls.append(1) or route_topk(*a))
    assert_same_routing(*moe_decode.route(router, x_TD), *ref)
    assert calls == [1]
    grouped = Router(MoEConfig(dim=64, num_experts=60, top_k=8, num_groups=6, topk_groups=2))
    moe_decode.route(grouped.to(DEVICE), x_TD)
    assert calls == [1]   # group-limited routing stays on the torch path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 32])
def test_route_topk_on_cuda_at_qwen3_shape(T, dtype, monkeypatch):
    """Qwen3-30B-A3B's router: D 2048, E 128, K 8 (and a 256-expert router), decode batches."""
    for D, E in [(2048, 128), (2048, 256)]:
        x_TD = torch.randn(T, D, device="cuda", dtype=dtype)
        for norm in (True, False):
            router = make_router(D, E, 8, dtype, norm, device="cuda")
            out = route_topk(x_TD, router.weight, 8, norm, 1.0)
            assert_same_routing(*out, *torch_route(router, x_TD, monkeypatch))
            assert moe_decode.fused_router(x_TD)


@pytest.mark.parametrize("T", [1, 3, 33])
def test_fused_topk_equals_the_topk_launch(T, monkeypatch):
    """DROPLESS_DECODE_FUSION=1: the logits kernel's last program per token block (33 tokens: five
    blocks of 8, the last partial) takes the top-k that router_topk_kernel takes in a launch of its
    own, from the same partials: the same ids (the same sums of the partials) and weights within
    a rounding (on a GPU the fused softmax sums over 4 warps, the top-k launch's over one), with
    the norm folded in and without; the arrival counters are left at zero."""
    monkeypatch.setattr(triton_router, "_num_sms", lambda device: 132)
    fresh_counters(monkeypatch)
    torch.manual_seed(T)
    x_TD = torch.randn(T, 1000, device=DEVICE)
    norm_w = torch.rand(1000, device=DEVICE) + 0.5
    router = make_router(1000, 128, 8, torch.float32)
    outs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("DROPLESS_DECODE_FUSION", fused)
        outs[fused] = (*route_topk(x_TD, router.weight, 8, True, 1.0),
                       *norm_route_topk(x_TD, norm_w, 1e-6, router.weight, 8, False, 2.5))
    for a, b in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b) if a.dtype != torch.float32 else rel_err(a, b) < 1e-6
    assert counters_at_rest()
