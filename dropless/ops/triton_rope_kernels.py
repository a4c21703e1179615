"""The attention prologue of a decode step as one kernel: per-head RMSNorm of q and k, RoPE, and
the KV-cache writes.

Shape contract (b rows, H heads, G kv heads, Dh head dim, even):
  q [b, H, Dh], k [b, G, Dh], v [b, G, Dh] (activation dtype; heads contiguous inside a row, rows
  stride_q / stride_kv apart: views of one fused q|k|v projection work), q_w / k_w [Dh] (NORM only),
  cos / sin [b, Dh] float32 (sin with rotate_half's sign folded in), idx [b * G] flat cache rows
  -> q_out [b, H, Dh] = rope(norm(q)); k_cache[idx] = rope(norm(k)), v_cache[idx] = v, where the
  caches are seen as flat rows of Dh and cast to their dtype.
One program per (row, head) over the H query heads then the G kv heads (those also copy v). A
program holds its head as two halves, x1 = x[:Dh/2] and x2 = x[Dh/2:], so rotate_half is a swap
of registers: rope = (x1 * cos1 + x2 * sin1, x2 * cos2 + x1 * sin2).
Numerics as the unfused torch ops: the norm's statistics and product in float32, rounded to the
activation dtype (as F.rms_norm returns it); the rotation in float32, rounded at the end.
"""

import triton
import triton.language as tl

from dropless.ops.triton_pdl import pdl_start, prefetch_l2


@triton.jit
def norm_rope_cache_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, idx_ptr, q_out_ptr,
    k_cache_ptr, v_cache_ptr,
    # sizes
    H, G, Dh, stride_q, stride_kv, eps,
    # meta
    NORM: tl.constexpr, BLOCK: tl.constexpr,
    # PREFETCH: the programs share an L2 prefetch of pf_bytes from pf_ptr (a later kernel's
    # weights; before the wait: they do not depend on the kernel before)
    pf_ptr=None, pf_bytes=0, PREFETCH: tl.constexpr = False, PF_CHUNK: tl.constexpr = 65536,
    PDL: tl.constexpr = False,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    if PREFETCH:
        prefetch_l2(pf_ptr, pf_bytes, row * tl.num_programs(1) + head,
                    tl.num_programs(0) * tl.num_programs(1), PF_CHUNK)
    pdl_start(PDL)
    half = Dh // 2
    offs = tl.arange(0, BLOCK)
    ok = offs < half
    # 1. the head, as two halves, and its norm weight
    if head < H:
        x_row = q_ptr + row.to(tl.int64) * stride_q + head * Dh
        w_ptr = q_w_ptr
    else:
        x_row = k_ptr + row.to(tl.int64) * stride_kv + (head - H) * Dh
        w_ptr = k_w_ptr
    x1 = tl.load(x_row + offs, mask=ok, other=0.0)
    x2 = tl.load(x_row + half + offs, mask=ok, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    # 2. RMSNorm, rounded to the activation dtype
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1) + tl.sum(x2 * x2)) / Dh + eps)
        w1 = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)
        x1 = (x1 * rstd * w1).to(dtype).to(tl.float32)
        x2 = (x2 * rstd * w2).to(dtype).to(tl.float32)
    # 3. RoPE in float32, rounded to the activation dtype
    cs = row.to(tl.int64) * Dh + offs
    y1 = x1 * tl.load(cos_ptr + cs, mask=ok) + x2 * tl.load(sin_ptr + cs, mask=ok)
    y2 = x2 * tl.load(cos_ptr + half + cs, mask=ok) + x1 * tl.load(sin_ptr + half + cs, mask=ok)
    y1, y2 = y1.to(dtype), y2.to(dtype)
    # 4. q out; k and v into their cache rows
    if head < H:
        out_row = q_out_ptr + (row * H + head).to(tl.int64) * Dh
        tl.store(out_row + offs, y1, mask=ok)
        tl.store(out_row + half + offs, y2, mask=ok)
    else:
        kv = (row * G + head - H).to(tl.int64)
        dst = tl.load(idx_ptr + kv) * Dh
        cache_ty = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dst + offs, y1.to(cache_ty), mask=ok)
        tl.store(k_cache_ptr + dst + half + offs, y2.to(cache_ty), mask=ok)
        offs_v = tl.arange(0, 2 * BLOCK)
        v_row = v_ptr + row.to(tl.int64) * stride_kv + (head - H) * Dh
        v = tl.load(v_row + offs_v, mask=offs_v < Dh)
        tl.store(v_cache_ptr + dst + offs_v, v.to(v_cache_ptr.dtype.element_ty), mask=offs_v < Dh)
