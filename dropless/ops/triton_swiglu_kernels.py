"""Triton kernels of the SwiGLU elementwise stage. Imported only by `triton_swiglu.py`.

Legend: R rows, N hidden columns per half. gu [R, 2N] holds g (first N columns) then u; the block-
sparse experts' [g | u] block data has the same layout with R = row blocks, N = a half's block data.
Rounding follows PyTorch's ops step by step (silu(g) rounded to the storage dtype, then the product),
so results match the unfused ops up to the exp implementation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(gu_ptr, h_ptr, N, numel, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    row = idx // N
    col = idx % N
    g = tl.load(gu_ptr + row * 2 * N + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + col, mask=ok, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + idx, (silu * u).to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def swiglu_backward_kernel(gu_ptr, dh_ptr, h_ptr, dgu_ptr, N, numel,
                           WRITE_H: tl.constexpr, BLOCK: tl.constexpr):
    """d[g | u] from dh (and, if WRITE_H, h = silu(g) * u recomputed), reading g, u and dh once."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    row = idx // N
    col = idx % N
    dtype = dgu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * N + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + col, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)   # as the forward: same h
    if WRITE_H:
        tl.store(h_ptr + idx, (silu * u).to(dtype), mask=ok)
    dsilu = (dh * u).to(dtype).to(tl.float32)
    tl.store(dgu_ptr + row * 2 * N + col, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(dtype), mask=ok)
    tl.store(dgu_ptr + row * 2 * N + N + col, (dh * silu).to(dtype), mask=ok)
