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
def swiglu_kernel(gu_ptr, w_ptr, h_ptr, N, numel, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """h = silu(g) * u, times the row's routing weight w[row] if HAS_W (h rounded first, as
    PyTorch's h.mul_(w) would see it)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    row = idx // N
    col = idx % N
    dtype = h_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * N + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * N + N + col, mask=ok, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    h = silu * u
    if HAS_W:
        h = h.to(dtype).to(tl.float32) * tl.load(w_ptr + row, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + idx, h.to(dtype), mask=ok)


@triton.jit
def swiglu_weighted_backward_kernel(gu_ptr, dhw_ptr, w_ptr, hw_ptr, dw_ptr, dgu_ptr, R, N,
                                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                                    WRITE_DGU: tl.constexpr):
    """Backward of y = (w * h) @ down for h = silu(g) * u, given dh' = dy @ down^T: writes
    hw = w * h (for d(down)), dw[row] = sum_n dh' * h (fp32 sum of the products rounded to the
    storage dtype, as PyTorch's (dh' * h).sum(-1, dtype=float32)) and dh = w * dh' in place over
    dh'. With WRITE_DGU, d[g | u] from dh instead (swiglu_backward_kernel's formula, from the same
    rounded dh), and hw over dh' (hw_ptr is dhw_ptr): the two passes in one. One program per
    BLOCK_R rows, walking the row in BLOCK_N columns."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    dtype = hw_ptr.dtype.element_ty
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols < N)[None, :]
        gu_at = gu_ptr + rows[:, None] * 2 * N + cols[None, :]
        at = rows[:, None] * N + cols[None, :]
        g = tl.load(gu_at, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_at + N, mask=ok, other=0.0).to(tl.float32)
        dhw = tl.load(dhw_ptr + at, mask=ok, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        h = (silu * u).to(dtype).to(tl.float32)
        acc += tl.sum((dhw * h).to(dtype).to(tl.float32), axis=1)
        dh = (dhw * w).to(dtype)
        if WRITE_DGU:   # (this program's own elements of dh', read above: safe to overwrite)
            dh = dh.to(tl.float32)
            dsilu = (dh * u).to(dtype).to(tl.float32)
            dgu_at = dgu_ptr + rows[:, None] * 2 * N + cols[None, :]
            tl.store(dgu_at, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(dtype), mask=ok)
            tl.store(dgu_at + N, (dh * silu).to(dtype), mask=ok)
        else:
            tl.store(dhw_ptr + at, dh, mask=ok)
        tl.store(hw_ptr + at, (h * w).to(dtype), mask=ok)
    tl.store(dw_ptr + rows, acc.to(dw_ptr.dtype.element_ty), mask=row_ok)


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
