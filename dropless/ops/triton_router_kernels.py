"""Triton kernel of the fused router. Imported only by `triton_router.py`.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def route_topk_kernel(
    # logits [T, E] fp32 contiguous; bias [E] fp32 (selection only) when HAS_BIAS
    logits_ptr, bias_ptr,
    # out: weights [T, K] fp32, expert ids [T, K] int64
    w_ptr, ids_ptr,
    T, E, scale,
    K: tl.constexpr, KP: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=ok,
                     other=float("-inf"))
    logits = tl.where(row_ok[:, None], logits, 0.0)   # rows past T: finite, never stored
    # 1. scores: softmax over all E, or sigmoid
    if SOFTMAX:
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        e = tl.where(col_ok[None, :], e, 0.0)
        scores = e / tl.sum(e, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    # 2. selection scores (+ bias), padding columns never chosen
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    select = tl.where(col_ok[None, :], select, float("-inf"))
    # 3. top-k by K rounds of argmax (descending, lowest index among equal values)
    ks = tl.arange(0, KP)
    weights = tl.zeros((BLOCK_T, KP), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, KP), dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(select, axis=1)
        idx = tl.min(tl.where(select == best[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = cols[None, :] == idx[:, None]
        w_k = tl.sum(tl.where(chosen, scores, 0.0), axis=1)
        weights = tl.where(ks[None, :] == k, w_k[:, None], weights)
        ids = tl.where(ks[None, :] == k, idx[:, None].to(tl.int64), ids)
        select = tl.where(chosen, float("-inf"), select)
    # 4. weights from the unbiased scores, renormalized, scaled
    if NORM:
        weights = weights / tl.maximum(tl.sum(weights, axis=1), 1e-20)[:, None]
    weights = weights * scale
    out_ok = row_ok[:, None] & (ks[None, :] < K)
    out = rows[:, None].to(tl.int64) * K + ks[None, :]
    tl.store(w_ptr + out, weights, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)
