"""Split-KV ("flash decoding") attention for one query token per cache row, grouped-query heads.

Shape contract (b rows, H heads, G kv heads, GROUP = H / G, Dh head dim, a power of two, S cache
length, splits key chunks of `chunk` keys, a multiple of BLOCK_N):
  q [b, H, Dh] (heads at stride_qh, rows at stride_qb; head h belongs to kv head h // GROUP),
  k / v cache [b, G, S, Dh] (any strides but the last), positions [b] int64, length <= S
  -> out [b, H, Dh] = softmax(q k^T / sqrt(Dh)) v over keys [0, min(position + 1, length)): the
  additive causal mask of decode.make_step, so a row past `length` (the engine's scratch row at
  S - 1) sees all of [0, length), finite garbage. Keys at or past `length` are never read.
1. `decode_split_kernel`, grid (b, G, splits): one program per (row, kv head, chunk) holds all GROUP
   query heads of its kv head as the rows of one tile (padded to BLOCK_H >= 16, tl.dot's least), so
   each key and value tile is read once for the group. Online softmax over the chunk's visible
   keys (the loop stops at the row's position: chunks past it do no work), in float32 with the
   scale and log2(e) folded into one multiply (exp2). With one split it writes the output itself;
   else the partials (running max m, sum l, unnormalised acc), float32.
2. `decode_combine_kernel`, grid (b * H,): the splits' partials rescaled to their common max.
   Split 0 always holds key 0, so every (row, head) has one finite max and a positive sum. With
   COMBINE (device.decode_fusion, few splits), decode_split_kernel does this itself: the last of
   a (row, kv head)'s splits to arrive combines its group's heads (triton_sync.py), one launch
   instead of two.
"""

import triton
import triton.language as tl

from dropless.ops.triton_pdl import pdl_start
from dropless.ops.triton_sync import last_to_arrive, rearm


@triton.jit
def decode_split_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    # sizes
    length, chunk, qk_scale,
    # strides (elements)
    stride_qb, stride_qh, stride_kb, stride_kg, stride_ks, stride_vb, stride_vg, stride_vs,
    # meta
    GROUP: tl.constexpr, DH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # COMBINE: decode_combine_kernel's work for the group's heads, in the last of a (row, kv head)'s
    # splits to arrive (int32 counters cnt, one per (row, kv head))
    cnt_ptr, COMBINE: tl.constexpr = False, BLOCK_G: tl.constexpr = 1, BLOCK_C: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    H = tl.num_programs(1) * GROUP
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, DH)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv * GROUP + offs_h
    ok_h = offs_h < GROUP
    # 1. the group's queries (padding rows are zeros: finite scores, never stored)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=ok_h[:, None], other=0.0)
    # 2. this chunk's visible keys [lo, hi): empty when the chunk starts past the row's position
    visible = tl.minimum(tl.load(pos_ptr + row).to(tl.int32) + 1, length)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, visible)
    k_row = k_ptr + row * stride_kb + kv.to(tl.int64) * stride_kg
    v_row = v_ptr + row * stride_vb + kv.to(tl.int64) * stride_vg
    # 3. online softmax over the chunk, a tile of BLOCK_N keys at a time
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DH], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        ok_n = keys < hi   # every tile holds >= 1 visible key: m_new is finite
        k = tl.load(k_row + keys[:, None] * stride_ks + offs_d[None, :], mask=ok_n[:, None],
                    other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # log2 units
        s = tl.where(ok_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row + keys[:, None] * stride_vs + offs_d[None, :], mask=ok_n[:, None],
                    other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # 4. the output (one split: its chunk holds key 0, l_i > 0), or the partials
    if DIRECT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + (row * H + heads[:, None]) * DH + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok_h[:, None])
    else:
        part = (row * H + heads) * splits + split
        tl.store(m_ptr + part, m_i, mask=ok_h)
        tl.store(l_ptr + part, l_i, mask=ok_h)
        tl.store(acc_ptr + part[:, None] * DH + offs_d[None, :], acc, mask=ok_h[:, None])
        if COMBINE:
            cnt = cnt_ptr + row * tl.num_programs(1) + kv
            if last_to_arrive(cnt, splits):
                _combine(m_ptr, l_ptr, acc_ptr, out_ptr, row * H + kv * GROUP, GROUP, splits,
                         DH, BLOCK_G, BLOCK_C)
                rearm(cnt)


@triton.jit
def decode_combine_kernel(
    # tensors: partials [b * H, splits] (m, l) and [b * H, splits, DH] (acc); out [b * H, DH]
    m_ptr, l_ptr, acc_ptr, out_ptr,
    # sizes
    splits,
    # meta
    DH: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    _combine(m_ptr, l_ptr, acc_ptr, out_ptr, tl.program_id(0), 1, splits, DH, 1, BLOCK_C)


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, out_ptr, rh0, rows, splits, DH: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[rh] for the `rows` (row * H + head) rows from rh0: the splits' partials rescaled to
    their common max, BLOCK_C splits' [DH] accumulators loaded at a time as one tile (their loads
    in flight together), from L2 (other programs wrote them). Split 0 always holds key 0, so every
    (row, head) has one finite max and a positive sum; empty splits weigh exp2(-inf) = 0."""
    g = tl.arange(0, BLOCK_G)
    g_ok = g < rows
    rh = (rh0 + g).to(tl.int64)
    offs_d = tl.arange(0, DH)
    m_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    for c0 in range(0, splits, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = g_ok[:, None] & (c < splits)[None, :]
        m = tl.load(m_ptr + rh[:, None] * splits + c[None, :], mask=ok, other=float("-inf"),
                    cache_modifier=".cg")
        m_max = tl.maximum(m_max, tl.max(m, 1))
    m_max = tl.where(g_ok, m_max, 0.0)   # padding rows: finite, never stored
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DH], tl.float32)
    for c0 in range(0, splits, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = g_ok[:, None] & (c < splits)[None, :]
        part = rh[:, None] * splits + c[None, :]
        w = tl.exp2(tl.load(m_ptr + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    - m_max[:, None])
        total += tl.sum(w * tl.load(l_ptr + part, mask=ok, other=0.0, cache_modifier=".cg"), 1)
        a = tl.load(acc_ptr + part[:, :, None] * DH + offs_d[None, None, :], mask=ok[:, :, None],
                    other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * a, 1)
    tl.store(out_ptr + rh[:, None] * DH + offs_d[None, :],
             (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
