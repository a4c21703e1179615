"""The RMSNorm that decode kernels fold into their prologue (router logits, linear_rows): each
program takes its rows' statistics over the whole row, then normalises each tile it loads, rounded
to x's dtype as F.rms_norm's output is. Imported only by Triton kernel modules."""

import triton
import triton.language as tl


@triton.jit
def rows_rstd(x_rows, t_ok, D, eps, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_T]: 1 / sqrt(mean(x^2) + eps) of the rows x_rows (pointers [BLOCK_T, 1] to
    rows of D contiguous features; rows not t_ok read as 0)."""
    sq = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + ds[None, :], mask=t_ok[:, None] & (ds < D)[None, :], other=0.0)
        sq += x.to(tl.float32) * x.to(tl.float32)
    return tl.rsqrt(tl.sum(sq, axis=1) / D + eps)


@triton.jit
def normed(x, rstd, norm_ptr, ds, d_ok):
    """x [BLOCK_T, BLOCK_D] (features ds) times rstd [BLOCK_T] and norm_w[ds], in x's dtype."""
    nw = tl.load(norm_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(x.dtype)
