"""Triton kernels of the weighted combine. Imported only by `triton_combine.py`'s launchers.

Legend: T tokens, D model dim, K top-k, R routed rows, S slots (t*K + k).

- `combine_kernel`: y_TD[t] = sum_k w[t, k] * y_RD[row(t, k)], gathered straight from the expert
  rows (no slot-order copy), accumulated in fp32 in k order and rounded once, like the batched
  matmul it replaces.
- `combine_backward_kernel`: dy_RD[row(t, k)] = w[t, k] * dy_TD[t] and d(w)[t, k] = <dy_TD[t],
  y_RD[row(t, k)]>, one program per token. Every row has exactly one slot: no atomics.
Dropped slots (capacity plans, keep == 0) contribute nothing and write no row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    y_ptr, stride_yr,                 # y_RD
    w_ptr, row_ptr, keep_ptr,         # [T*K]: routing weight, row, keep (int8) of every slot
    out_ptr, stride_ot,               # y_TD
    D,
    K: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(row_ptr + t * K + k).to(tl.int64)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        y = tl.load(y_ptr + row * stride_yr + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_KEEP:
            y = tl.where(tl.load(keep_ptr + t * K + k) != 0, y, 0.0)
        acc += w * y
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def combine_backward_kernel(
    dy_ptr, stride_dt,                # dy_TD
    y_ptr, stride_yr,                 # y_RD
    w_ptr, row_ptr, keep_ptr,         # [T*K]
    dyr_ptr, stride_dr,               # dy_RD (out)
    dw_ptr,                           # d(w) [T*K] (out)
    D,
    K: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(K):
        row = tl.load(row_ptr + t * K + k).to(tl.int64)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + t * K + k).to(tl.int32)
        else:
            keep = 1
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            ok = cols < D
            dy = tl.load(dy_ptr + t * stride_dt + cols, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row * stride_yr + cols, mask=ok, other=0.0).to(tl.float32)
            acc += dy * y
            tl.store(dyr_ptr + row * stride_dr + cols, (w * dy).to(dyr_ptr.dtype.element_ty),
                     mask=ok & (cols < D * keep))   # D * keep = 0: a dropped slot writes no row
        dw = tl.sum(acc, axis=0)
        if HAS_KEEP:
            dw = tl.where(keep != 0, dw, 0.0)
        tl.store(dw_ptr + t * K + k, dw.to(dw_ptr.dtype.element_ty))
