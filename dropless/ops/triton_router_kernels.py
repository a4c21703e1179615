"""The plain softmax top-k router of a decode step as two kernels: the logits, then per token the
top-k and the softmax. Imported only by triton_router.py's launcher, so that importing dropless
never needs triton.

Legend: T tokens, D model dim, E experts, K top-k, P split-D partials.

Shape contract:
  router_logits_kernel: x [T, D] (rows stride_x apart, features contiguous), w [E, D] contiguous,
    any float dtypes -> part [P, T, E] float32, part[p] = x[:, Dp] @ w[:, Dp]^T over the p-th
    run of D_SPLIT features. Grid (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E), P): at T = 1 the
    experts alone give too few programs to read w fast, so D is split too; the partials are
    summed by the next kernel (deterministic, no atomics). With NORM, x is first the RMSNorm
    of itself (norm_w [D], eps), rounded to x's dtype as F.rms_norm's output is; each program
    takes its rows' statistics over all of D (a few KB that stay in L2), and the programs of
    the first expert block write that normalised x to h [T, D] (contiguous, x's dtype): the
    experts' input, without a norm kernel of its own.
  router_topk_kernel: part [P, T, E] -> weights [T, K] float32, ids [T, K] int64. Grid (T,).
    Slot k holds the k-th largest logit (sorted, which the unsorted contract allows). With TOPK
    (device.decode_fusion), router_logits_kernel does this itself: the last of a token block's
    programs to arrive (triton_sync.py), one launch instead of two.
Numerics: products and sums in float32 of the inputs as loaded (bf16/fp16 products are exact in
float32), as the torch path's float32 GEMM; the softmax as torch's, exp(l - max) / sum.
"""

import triton
import triton.language as tl

from dropless.ops.triton_norm_kernels import normed, rows_rstd
from dropless.ops.triton_pdl import pdl_start
from dropless.ops.triton_sync import last_to_arrive, rearm


@triton.jit
def _x_step(x_rows, ts, t_ok, ds, d_ok, rstd, norm_ptr, h_ptr, D, NORM: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_D]: the rows' x at features ds; with NORM normalised (rounded to x's
    dtype, as F.rms_norm's output), and the first expert block's programs store it to h."""
    x = tl.load(x_rows + ds[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    if NORM:
        x = normed(x, rstd, norm_ptr, ds, d_ok)
        if tl.program_id(1) == 0:
            tl.store(h_ptr + ts.to(tl.int64)[:, None] * D + ds[None, :], x,
                     mask=t_ok[:, None] & d_ok[None, :])
    return x.to(tl.float32)


@triton.jit
def router_logits_kernel(
    # tensors
    x_ptr, w_ptr, part_ptr, norm_ptr, h_ptr,
    # sizes
    T, E, D, stride_x, D_SPLIT, eps,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr,
    # TOPK: router_topk_kernel's work too, for each token block in the last of its programs to
    # arrive (int32 counters cnt, one per token block)
    weights_ptr, ids_ptr, cnt_ptr, K, route_scale,
    TOPK: tl.constexpr, NORM_TOPK: tl.constexpr, TOPK_BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False, PRELOAD: tl.constexpr = False,
):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    es = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(2)
    t_ok, e_ok = ts < T, es < E
    d_lo = split * D_SPLIT
    d_hi = tl.minimum(d_lo + D_SPLIT, D)
    x_rows = x_ptr + ts.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + es.to(tl.int64)[:, None] * D
    d_first, rstd = d_lo, 0.0
    if PRELOAD:   # the router's weight is not written by the kernel before: its first step is
        ds = d_lo + tl.arange(0, BLOCK_D)   # loaded before the PDL wait
        w_first = tl.load(w_rows + ds[None, :], mask=e_ok[:, None] & (ds < d_hi)[None, :],
                          other=0.0)
        d_first = d_lo + BLOCK_D
    pdl_start(PDL)
    if NORM:   # each row's mean square over all of D
        rstd = rows_rstd(x_rows, t_ok, D, eps, BLOCK_T, BLOCK_D)
    # elementwise products accumulate across the D loop; one reduction at the end
    acc = tl.zeros((BLOCK_T, BLOCK_E, BLOCK_D), dtype=tl.float32)
    if PRELOAD:
        ds = d_lo + tl.arange(0, BLOCK_D)
        x = _x_step(x_rows, ts, t_ok, ds, ds < d_hi, rstd, norm_ptr, h_ptr, D, NORM)
        acc += x[:, None, :] * w_first.to(tl.float32)[None, :, :]
    for d0 in range(d_first, d_hi, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_hi
        x = _x_step(x_rows, ts, t_ok, ds, d_ok, rstd, norm_ptr, h_ptr, D, NORM)
        w = tl.load(w_rows + ds[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    logits = tl.sum(acc, axis=2)
    out = part_ptr + (split * T + ts).to(tl.int64)[:, None] * E + es[None, :]
    tl.store(out, logits, mask=t_ok[:, None] & e_ok[None, :])
    if TOPK:
        cnt = cnt_ptr + tl.program_id(0)
        if last_to_arrive(cnt, tl.num_programs(1) * tl.num_programs(2)):
            for i in range(BLOCK_T):
                t = tl.program_id(0) * BLOCK_T + i
                if t < T:
                    _topk_row(part_ptr, weights_ptr, ids_ptr, t, T, E, K, tl.num_programs(2),
                              route_scale, NORM_TOPK, TOPK_BLOCK_E)
            rearm(cnt)


@triton.jit
def router_topk_kernel(
    # tensors
    part_ptr, weights_ptr, ids_ptr,
    # sizes
    T, E, K, P, route_scale,
    # meta
    NORM_TOPK: tl.constexpr, BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    _topk_row(part_ptr, weights_ptr, ids_ptr, tl.program_id(0), T, E, K, P, route_scale,
              NORM_TOPK, BLOCK_E)


@triton.jit
def _topk_row(part_ptr, weights_ptr, ids_ptr, t, T, E, K, P, route_scale,
              NORM_TOPK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Token t's top-k experts and their weights from the split logits part [P, T, E] (from L2:
    other programs wrote them)."""
    es = tl.arange(0, BLOCK_E)
    e_ok = es < E
    # 1. the token's logits: the sum of the split partials (lanes past E: 0, masked below)
    logits = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for p in range(P):
        logits += tl.load(part_ptr + (p * T + t).to(tl.int64) * E + es, mask=e_ok, other=0.0,
                          cache_modifier=".cg")
    # 2. K rounds of max with the index; a chosen lane is marked by its slot (-1: not chosen) and
    # leaves the candidates as -inf. Every real lane's key is above -inf (a -inf logit ranks as
    # the lowest finite value, NaN above everything, as torch.topk ranks it), so K <= E rounds
    # take K distinct real experts and write every slot, whatever the logits. Ties go to the
    # lowest index first.
    cand = tl.where(logits != logits, float("inf"), tl.maximum(logits, -3.4028234663852886e38))
    cand = tl.where(e_ok, cand, float("-inf"))
    slot = tl.full((BLOCK_E,), -1, dtype=tl.int32)
    for k in range(K):
        _, best = tl.max(cand, axis=0, return_indices=True, return_indices_tie_break_left=True)
        slot = tl.where(es == best, k, slot)
        cand = tl.where(es == best, float("-inf"), cand)
    chosen = slot >= 0
    # 3. softmax: over the chosen logits (NORM_TOPK) or all E, gathered at the chosen; the first
    # round's maximum is the maximum of both
    top = tl.max(tl.where(e_ok, logits, float("-inf")), axis=0)
    p_E = tl.where(e_ok, tl.exp(logits - top), 0.0)
    if NORM_TOPK:
        denom = tl.sum(tl.where(chosen, p_E, 0.0), axis=0)
    else:
        denom = tl.sum(p_E, axis=0)
    w = p_E / denom * route_scale   # scaled after the normalisation, as the torch path (x 1: exact)
    # 4. each chosen expert to its slot
    out = t.to(tl.int64) * K + slot
    tl.store(weights_ptr + out, w, mask=chosen)
    tl.store(ids_ptr + out, es.to(tl.int64), mask=chosen)
