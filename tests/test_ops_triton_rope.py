"""The decode step's attention prologue kernel (norms, RoPE, cache writes) against the torch ops of
dropless/serve/decode.py.

On a GPU when there is one, else on the CPU under the Triton interpreter. The kernel computes in
float32 and only casts to bf16, which the interpreter does by truncation (the GPU rounds to
nearest): bf16 agrees to a unit in the last place here, hence its tolerance."""

import pytest
import torch

from triton_env import DEVICE, TOL   # first: it sets up Triton

from dropless.config import ModelConfig, MoEConfig
from dropless.model import RMSNorm
from dropless.ops.triton_rope import norm_rope_cache
from dropless.serve.decode import make_step, rms_norm, rope
from tests.conftest import rel_err

S = 16   # cache length


def check_prologue(b, H, G, Dh, dtype, norm, device=DEVICE, fused=False, prefetch=None):
    """Kernel vs torch ops for b rows at different positions. norm: None (no qk-norm) or the norm
    weights' dtype, "x" for the activations' (decode.rms_norm runs F.rms_norm, else the module).
    fused: q, k, v as views of one [b, (H + 2G) Dh] product, as the engine's fused projection
    gives them (rows strided, read in place)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=H * Dh, num_heads=H, num_kv_heads=G, head_dim=Dh,
                      moe=MoEConfig(dim=H * Dh))
    step = make_step(cfg, (torch.arange(b, device=device) * 5 + 5) % S, S, dtype)
    q, k, v = (torch.randn(b, n, Dh, device=device, dtype=dtype) for n in (H, G, G))
    if fused:
        q, k, v = (t.view(b, -1, Dh) for t in torch.cat([q, k, v], 1).flatten(1).split(
            [H * Dh, G * Dh, G * Dh], dim=1))
        assert not q.is_contiguous() or b == 1
    k_cache, v_cache = (torch.randn(b, G, S, Dh, device=device, dtype=dtype) for _ in range(2))
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    # the torch ops of decode.gqa
    weights, q_ref, k_ref = (None, None), q, k
    if norm is not None:
        norms = [RMSNorm(Dh, 1e-6).to(device, dtype if norm == "x" else norm) for _ in range(2)]
        with torch.no_grad():
            weights = tuple(n.weight.uniform_(0.5, 1.5) for n in norms)
        q_ref, k_ref = rms_norm(norms[0], q), rms_norm(norms[1], k)
    q_ref, k_ref = rope(q_ref, step), rope(k_ref, step)
    k_cache_ref.view(-1, Dh).index_copy_(0, step.write_idx, k_ref.reshape(-1, Dh))
    v_cache_ref.view(-1, Dh).index_copy_(0, step.write_idx, v.reshape(-1, Dh))
    # the kernel
    q_out = norm_rope_cache(q, k, v, *weights, 1e-6, step.cos_n1R, step.sin_n1R, k_cache, v_cache,
                            step.write_idx, prefetch)
    written = torch.zeros(b * G * S, dtype=torch.bool, device=device)
    written[step.write_idx] = True
    k_rows, k_rows_ref = k_cache.view(-1, Dh), k_cache_ref.view(-1, Dh)
    assert q_out.dtype == dtype and rel_err(q_out, q_ref) < TOL[dtype]
    assert rel_err(k_rows[written], k_rows_ref[written]) < TOL[dtype]
    assert torch.equal(k_rows[~written], k_rows_ref[~written])   # other rows untouched
    assert torch.equal(v_cache, v_cache_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [None, "x", torch.float32])
@pytest.mark.parametrize("H,G", [(4, 4), (8, 2)])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("Dh", [64, 96, 128])   # 96: not a power of two (any even head_dim is)
def test_prologue_matches_torch_ops(dtype, norm, H, G, b, Dh):
    check_prologue(b, H, G, Dh, dtype, norm)


@pytest.mark.parametrize("norm", [None, "x"])
@pytest.mark.parametrize("H,G", [(4, 4), (8, 2), (1, 1)])
def test_prologue_reads_fused_projection_views(norm, H, G):
    check_prologue(3, H, G, 64, torch.float32, norm, fused=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,Dh", [(1, 128), (8, 128), (5, 256)])
def test_prologue_on_cuda_at_qwen3_shape(dtype, b, Dh):
    """Qwen3-30B-A3B's attention (32 heads, 4 kv heads, head_dim 128, per-head qk-norm), a batch of
    decode rows, and Dh 256."""
    check_prologue(b, 32, 4, Dh, dtype, "x", device="cuda")
    check_prologue(b, 32, 4, Dh, dtype, "x", device="cuda", fused=True)


def test_prefetch_args():
    """The L2 prefetch is a CUDA (sm_90+) hint: nothing elsewhere; on CUDA whole 16-byte units,
    at most PREFETCH_MAX_BYTES."""
    from dropless.ops import triton_rope
    assert triton_rope.prefetch_args(None) == {}
    assert triton_rope.prefetch_args(torch.zeros(100)) == {}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        args = triton_rope.prefetch_args(torch.zeros(1001, device="cuda", dtype=torch.bfloat16))
        assert args["pf_bytes"] == 2000 and args["PREFETCH"]
        big = torch.empty(triton_rope.PREFETCH_MAX_BYTES + 64, dtype=torch.uint8, device="cuda")
        assert triton_rope.prefetch_args(big)["pf_bytes"] == triton_rope.PREFETCH_MAX_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("numel", [1001, 3 << 20, 20 << 20])   # odd bytes; many chunks; past the cap
def test_prologue_with_prefetch_on_cuda(numel):
    """With an L2 prefetch of another tensor (a hint: the same results; bulk prefetches of
    chunks up to the tensor's end, never past it)."""
    weight = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    check_prologue(1, 32, 4, 128, torch.bfloat16, "x", device="cuda", fused=True, prefetch=weight)
    check_prologue(8, 32, 4, 128, torch.bfloat16, "x", device="cuda", prefetch=weight)
    torch.cuda.synchronize()
