"""Launcher of the decode step's attention prologue (triton_rope_kernels.py): per-head RMSNorm of q
and k, RoPE, and the writes of k and v into the KV cache, in one launch where the torch ops take
about a dozen (each ~2-5 us of a launch-bound step, even in a CUDA graph). Inference only (no
autograd); the torch ops stay the reference (dropless/serve/decode.py `gqa`).

Legend: b rows, H heads, G kv heads, Dh head dim, S cache length.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dropless.ops.device import cuda_capability_major, pdl_launch


@functools.cache
def _kernel():
    from dropless.ops.triton_rope_kernels import norm_rope_cache_kernel
    return norm_rope_cache_kernel


def _rows(x_bHD: Tensor) -> Tensor:
    """x itself when its heads are contiguous inside each row (rows at any stride, as in views
    of a fused q|k|v projection), else a contiguous copy."""
    H, Dh = x_bHD.shape[1:]
    if x_bHD.stride(2) == 1 and (x_bHD.stride(1) == Dh or H == 1):
        return x_bHD
    return x_bHD.contiguous()


PREFETCH_MAX_BYTES = 24 << 20   # at most half an H100's (and H200's) 50 MB L2


def prefetch_args(t: Tensor | None) -> dict:
    """The kernel's L2 prefetch of tensor t (its first PREFETCH_MAX_BYTES, whole 16-byte units):
    on CUDA at sm_90 and newer (bulk prefetch) for a contiguous, 16-byte aligned t, else none (a
    hint: nothing else depends on it)."""
    if t is None or not t.is_cuda or cuda_capability_major(t.device.index or 0) < 9 or \
            not t.is_contiguous() or t.data_ptr() % 16:
        return {}
    nbytes = min(t.numel() * t.element_size(), PREFETCH_MAX_BYTES) // 16 * 16
    return dict(pf_ptr=t, pf_bytes=nbytes, PREFETCH=nbytes > 0)


@torch.library.custom_op("dropless::norm_rope_cache", mutates_args=("k_cache", "v_cache"))
def norm_rope_cache(q_bHD: Tensor, k_bGD: Tensor, v_bGD: Tensor, q_w: Tensor | None,
                    k_w: Tensor | None, eps: float, cos_b1D: Tensor, sin_b1D: Tensor,
                    k_cache: Tensor, v_cache: Tensor, write_idx: Tensor,
                    prefetch: Tensor | None = None) -> Tensor:
    """q after RMSNorm (per head, when the weights q_w, k_w [Dh] are given) and RoPE (cos, and sin
    with the rotation's sign folded in, float32 as decode.Step holds them); k after the same and
    v are written to the flat cache rows write_idx [b * G] of k_cache, v_cache [b, G, S, Dh].
    `prefetch`: a contiguous tensor a later kernel reads (the output projection's weight), asked
    into L2 on the way (prefetch_args)."""
    b, H, Dh = q_bHD.shape
    G = k_bGD.shape[1]
    assert Dh % 2 == 0 and k_bGD.dtype == q_bHD.dtype and k_cache.is_contiguous() \
        and v_cache.is_contiguous() and (q_w is None) == (k_w is None)
    norm = q_w is not None
    if not norm:
        q_w = k_w = q_bHD   # not read
    q_out = q_bHD.new_empty(b, H, Dh)
    q_bHD, k_bGD, v_bGD = (_rows(t) for t in (q_bHD, k_bGD, v_bGD))
    if k_bGD.stride(0) != v_bGD.stride(0):
        k_bGD, v_bGD = k_bGD.contiguous(), v_bGD.contiguous()
    _kernel()[(b, H + G)](
        q_bHD, k_bGD, v_bGD, q_w, k_w,
        cos_b1D.contiguous(), sin_b1D.contiguous(), write_idx, q_out, k_cache, v_cache,
        H, G, Dh, q_bHD.stride(0), k_bGD.stride(0), eps, NORM=norm,
        BLOCK=1 << (Dh // 2 - 1).bit_length(), num_warps=1,
        **prefetch_args(prefetch), **pdl_launch(q_bHD.device))
    return q_out


@norm_rope_cache.register_fake
def _(q_bHD, k_bGD, v_bGD, q_w, k_w, eps, cos_b1D, sin_b1D, k_cache, v_cache, write_idx,
      prefetch=None):
    return q_bHD.new_empty(q_bHD.shape)
