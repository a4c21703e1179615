"""The decode step's dense projections as one kernel each: a few rows through an nn.Linear weight
as stored, with the RMSNorm before it and the residual after it folded in. Imported only by
triton_linear.py's launcher, so that importing dropless never needs triton.

Legend: T tokens, K input features, N output features.

Shape contract (linear_rows_kernel):
  x [T, K] (rows stride_x apart, features contiguous), w [N, K] contiguous (nn.Linear's layout:
  each output's weights are one contiguous run, read as such), norm_w [K], residual [T, N] (rows
  stride_r apart) -> out [T, N] contiguous, in out's dtype:
    out[t] = (residual[t] +) (xn[t] @ w^T),  xn = round(x * rsqrt(mean(x^2) + eps) * norm_w) with
  NORM (F.rms_norm's value in x's dtype: the statistics and products float32, rounded once), else
  xn = x. Grid (cdiv(N, BLOCK_N), cdiv(T, BLOCK_T)); every program reads its rows' whole K (the
  norm's statistics are recomputed per program from x, a few KB that stay in L2): no split, no
  partials, one launch.
Numerics: products and sums in float32 of the values as loaded; one rounding of the output.
"""

import triton
import triton.language as tl

from dropless.ops.triton_norm_kernels import normed, rows_rstd
from dropless.ops.triton_pdl import pdl_start


@triton.jit
def linear_rows_kernel(
    # tensors (norm_ptr, res_ptr: not read unless NORM, RES)
    x_ptr, w_ptr, norm_ptr, res_ptr, out_ptr,
    # sizes
    T, N, K, stride_x, stride_r, eps,
    # meta
    NORM: tl.constexpr, RES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr = False, PRELOAD: tl.constexpr = False,
):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_ok, t_ok = ns < N, ts < T
    x_rows = x_ptr + ts.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + ns.to(tl.int64)[:, None] * K
    k_first = 0
    if PRELOAD:   # the weight does not depend on the kernel before: its first step is loaded
        ks = tl.arange(0, BLOCK_K)   # before the PDL wait, while that kernel still runs
        w_first = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)
        k_first = BLOCK_K
    pdl_start(PDL)
    if NORM:   # each row's mean square, from the row as stored
        rstd = rows_rstd(x_rows, t_ok, K, eps, BLOCK_T, BLOCK_K)
    # elementwise products accumulate across the K loop; one reduction at the end. UNROLL steps
    # per iteration in one basic block: their independent loads are in flight together
    acc = tl.zeros((BLOCK_T, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PRELOAD:
        ks = tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=t_ok[:, None] & (ks < K)[None, :], other=0.0)
        if NORM:
            x = normed(x, rstd, norm_ptr, ks, ks < K)
        acc += x.to(tl.float32)[:, None, :] * w_first.to(tl.float32)[None, :, :]
    for k_outer in tl.range(k_first, K, BLOCK_K * UNROLL, num_stages=STAGES):
        for step in tl.static_range(UNROLL):
            ks = k_outer + step * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_rows + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:   # rounded to x's dtype, as F.rms_norm's output is
                x = normed(x, rstd, norm_ptr, ks, k_ok)
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    ok = t_ok[:, None] & n_ok[None, :]
    if RES:
        y += tl.load(res_ptr + ts.to(tl.int64)[:, None] * stride_r + ns[None, :], mask=ok,
                     other=0.0).to(tl.float32)
    out = out_ptr + ts.to(tl.int64)[:, None] * N + ns[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=ok)
