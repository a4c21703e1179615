"""The decode expert GEMV kernel (plain weights) against the training path of the MoE layer.

On a GPU when there is one, else on the CPU under the Triton interpreter (fp32/fp16 only)."""

import pytest
import torch

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton

from dropless import MoE, MoEConfig
from dropless.ops import gemv
from dropless.serve.moe_decode import moe_decode
from tests.conftest import counters_at_rest, fresh_counters, rel_err



@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("sms", [None, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,F,E,K", [(1, 64, 96, 8, 2), (3, 40, 24, 4, 4), (2, 128, 64, 16, 3),
                                       (1, 256, 128, 8, 8)])
def test_gemv_path_matches_training_path(dtype, T, D, F, E, K, sms, fused, monkeypatch):
    """sms 64: as on a GPU, split reductions (gate|up partials summed and SwiGLU'd by the down
    GEMV as it reads them); D 40 / F 24: reductions not a multiple of the block, masked. fused:
    the slots and splits summed by the down GEMV's last program to arrive (DROPLESS_DECODE_FUSION)
    instead of a launch of their own."""
    from dropless.ops.device import DECODE_FUSION_ENV
    monkeypatch.setenv(DECODE_FUSION_ENV, "1" if fused else "0")
    fresh_counters(monkeypatch)
    if sms:
        monkeypatch.setattr(gemv, "_num_sms", lambda device: sms)
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, num_shared_experts=1))
    moe = moe.to(DEVICE, dtype).eval()
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    residual = torch.randn(T, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref, _ = moe(x)
        out = moe_decode(moe, x, "triton")
        # the residual is added in the kernel that sums the slots, in fp32
        out_res = moe_decode(moe, x, "triton", residual=residual)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    assert rel_err(out_res, ref + residual) < TOL[dtype]
    assert not fused or counters_at_rest()


def test_fused_sum_matches_its_own_launch(monkeypatch):
    """The last program's sum equals the separate slot-sum launch's (fp32 partials, the same
    order), for the plain and the int4 down GEMV, with and without the residual, over several
    calls that share the counters."""
    from dropless.ops import awq
    from dropless.ops.device import DECODE_FUSION_ENV
    from dropless.quant.pack import quantize_packed

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=256, hidden_dim=128, num_experts=8, top_k=4)).to(DEVICE).eval()
    x, res = torch.randn(3, 256, device=DEVICE), torch.randn(3, 256, device=DEVICE)
    packed = [t.to(DEVICE) for t in quantize_packed(torch.randn(256, 192), 64)]
    monkeypatch.setattr(gemv, "_num_sms", lambda device: 64)   # split reductions
    fresh_counters(monkeypatch)

    def run():
        with torch.no_grad():
            return (moe_decode(moe, x, "triton"), moe_decode(moe, x, "triton", residual=res),
                    awq._linear_op(x, *packed), awq._linear_op(x, *packed, res[:, :192]))

    monkeypatch.setenv(DECODE_FUSION_ENV, "0")
    apart = run()
    monkeypatch.setenv(DECODE_FUSION_ENV, "1")
    for _ in range(2):
        for a, b in zip(run(), apart):
            assert rel_err(a, b) < 1e-6
    assert counters_at_rest()   # used, and left at zero
    monkeypatch.setenv(DECODE_FUSION_ENV, "on")
    with pytest.raises(ValueError, match="DROPLESS_DECODE_FUSION='on' is invalid: allowed: 0, 1"):
        run()


def test_gemv_path_no_tokens():
    moe = MoE(MoEConfig(dim=64, hidden_dim=32, num_experts=4, top_k=2)).to(DEVICE).eval()
    x, residual = torch.empty(0, 64, device=DEVICE), torch.empty(0, 64, device=DEVICE)
    with torch.no_grad():
        assert moe_decode(moe, x, "triton", residual=residual).shape == (0, 64)


def test_pipelined_loops_match(monkeypatch):
    """DROPLESS_GEMV_STAGES: the decode GEMVs (plain, int4) and the projections' kernel with
    software-pipelined loops give what the plain loops give (on a GPU the loads are staged
    through shared memory; the interpreter runs the same loop)."""
    from dropless.ops import awq
    from dropless.ops.triton_linear import linear_rows
    from dropless.quant.pack import quantize_packed

    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=256, hidden_dim=128, num_experts=8, top_k=2)).to(DEVICE).eval()
    x = torch.randn(1, 256, device=DEVICE)
    w = torch.randn(96, 256, device=DEVICE)
    packed = [t.to(DEVICE) for t in quantize_packed(torch.randn(256, 64), 128)]
    monkeypatch.setattr(gemv, "_num_sms", lambda device: 64)   # split reductions, several steps

    def run():
        with torch.no_grad():
            return (moe_decode(moe, x, "triton"), linear_rows(x, w, None, 0.0, None),
                    awq._linear_op(x, *packed))

    monkeypatch.setattr(gemv, "STAGES", {"plain": 1, "int4": 1, "linear": 1})
    monkeypatch.delenv(gemv.STAGES_ENV, raising=False)   # whatever the environment says
    plain = run()
    monkeypatch.setenv(gemv.STAGES_ENV, "plain=3,int4=2,linear=3")
    assert [gemv.stages(k) for k in ("plain", "int4", "linear")] == [3, 2, 3]
    for a, b in zip(run(), plain):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("value", ["plain=0", "dense=2", "int4", "int4=x", "linear=9"])
def test_stages_override_is_checked(value, monkeypatch):
    monkeypatch.setenv(gemv.STAGES_ENV, value)
    with pytest.raises(ValueError, match="DROPLESS_GEMV_STAGES: .* is invalid: allowed: KERNEL=N"):
        gemv.stages("plain")


@pytest.mark.parametrize("P,slots,T,D", [(1, 1, 1, 64), (3, 8, 1, 200), (5, 8, 2, 300),
                                         (2, 3, 3, 40), (1, 40, 1, 33)])
@pytest.mark.parametrize("residual", [False, True])
def test_sum_partials(P, slots, T, D, residual):
    """The slot sum against torch: P split partials x `slots` rows per token, whole tiles and a
    last partial one (P * slots over the kernel's 32 rows a tile: 40), columns past the block."""
    gen = torch.Generator().manual_seed(P * 100 + slots)
    y = torch.randn(P, T * slots, D, generator=gen).to(DEVICE)
    res = torch.randn(T, D, generator=gen).to(DEVICE, torch.float16) if residual else None
    out = gemv.sum_partials(y, slots, res, torch.float16)
    ref = y.view(P, T, slots, D).sum((0, 2)) + (0 if res is None else res.float())
    assert out.dtype == torch.float16 and out.shape == (T, D)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
