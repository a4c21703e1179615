"""The sums after the decode GEMVs (triton_gemv_kernels.py): their fp32 partials over the split
reduction and a token's slots, with the residual, rounded once; in a launch of its own
(`sum_slots_kernel`) or in the GEMV's last program to arrive (`_sum_tail`, triton_sync.py).
Imported only by the launchers' kernel modules, so that importing dropless never needs triton.

Legend: T tokens, K slots per token, D (or N) columns, SPLIT split partials.
"""

import triton
import triton.language as tl

from dropless.ops.triton_pdl import pdl_start
from dropless.ops.triton_sync import last_to_arrive, rearm


@triton.jit
def _sum_rows(p_ptr, stride_s, stride_m, t, slots, split, cols, ok, BLOCK_J: tl.constexpr):
    """fp32 [BLOCK]: the sum over s < split, k < slots of the fp32 partial rows
    p[s * stride_s + (t * slots + k) * stride_m + cols], BLOCK_J rows loaded at a time as one tile
    (their loads in flight together), in a fixed order. From L2 (".cg"): other programs, or the
    kernel before, wrote them."""
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for j0 in range(0, split * slots, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)          # row j: split j // slots, slot j % slots
        rows = ((j // slots).to(tl.int64) * stride_s
                + (t * slots + j % slots).to(tl.int64) * stride_m)
        tile = tl.load(p_ptr + rows[:, None] + cols[None, :],
                       mask=(j < split * slots)[:, None] & ok[None, :], other=0.0,
                       cache_modifier=".cg")
        acc += tl.sum(tile, axis=0)
    return acc


@triton.jit
def _sum_tail(out_ptr, stride_os, stride_om, total_ptr, res_ptr, cnt_ptr, r, n_tile, slots, N,
              SPLIT_K: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_J: tl.constexpr):
    """After a program stored its fp32 partial: the last of its token's slots x SPLIT_K programs
    at this column tile to arrive sums them all (and the residual) into total [T, N], rounded
    once (what sum_slots_kernel does in a launch of its own)."""
    t = r // slots
    cnt = cnt_ptr + t * tl.num_programs(1) + n_tile
    if last_to_arrive(cnt, slots * SPLIT_K):
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < N
        acc = _sum_rows(out_ptr, stride_os, stride_om, t, slots, SPLIT_K, cols, ok, BLOCK_J)
        if HAS_RES:
            acc += tl.load(res_ptr + t.to(tl.int64) * N + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(total_ptr + t.to(tl.int64) * N + cols, acc.to(total_ptr.dtype.element_ty),
                 mask=ok)
        rearm(cnt)


@triton.jit
def sum_slots_kernel(p_ptr, res_ptr, out_ptr, T, D, K, SPLIT,
                     HAS_RES: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    """out[t] = (residual[t] +) sum over s < SPLIT, k < K of p[s, t, k], p fp32 [SPLIT, T, K, D]:
    the split partials and the K slots of a token in one pass (BLOCK_J rows a tile: a loop of
    one row at a time waited ~0.3 us of L2 latency for each), rounded once."""
    pdl_start(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < D
    acc = _sum_rows(p_ptr, T * K * D, D, t, K, SPLIT, cols, ok, BLOCK_J)
    if HAS_RES:
        acc += tl.load(res_ptr + t.to(tl.int64) * D + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)
