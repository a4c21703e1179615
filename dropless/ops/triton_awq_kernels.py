"""Triton kernels for int4 (AWQ GEMM layout) weights. Imported only by `awq.py`'s launchers, so that
importing dropless never needs triton.

Legend: R rows (routed slots or tokens), KD reduction length (input features), N output columns of
one product, WN the packed matrix's full width (2N for gate|up, N otherwise), GS group size.

Weight contract (per expert, row-major, contiguous inside one expert):
  qweight int32 [KD, WN/8], qzeros int32 [KD/GS, WN/8], scales fp16/bf16/fp32 [KD/GS, WN];
  w[k, n] = (nibble(qweight[k, n/8], n%8) - nibble(qzeros[k/GS, n/8], n%8)) * scales[k/GS, n],
  column c of a run of eight in nibble (c%2)*4 + c/2 (AutoAWQ's order).
A reduction step covers BLOCK_K rows inside one group (BLOCK_K divides GS), so one row of zeros and
scales serves the whole tile. Weights are dequantized in registers; accumulation is fp32.

- `awq_grouped_kernel` (prefill): expert-contiguous row tiles (the tile map of triton_grouped) x
  column tiles, tl.dot on the dequantized tile in the activation dtype.
- decode (a few rows) runs the GEMV kernel of triton_gemv_kernels.py, which reads plain or int4
  weights with the same `_dequant_tile`.
It can fuse SwiGLU (gate and up columns in one pass) and a per-row scale (routing weight).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dropless.ops.triton_gemv_kernels import _dequant_tile


@triton.jit
def awq_grouped_kernel(
    # a [*, KD] (rows through a_row when GATHER); c [*, N] (rows through out_row when SCATTER)
    a_ptr, stride_am,
    c_ptr, stride_cm,
    qw_ptr, qz_ptr, sc_ptr, stride_qe, stride_ze, stride_se,
    # tile map (expert and first row per row tile, row end per expert); ignored when DENSE
    tile_expert_ptr, tile_row_ptr, row_end_ptr,
    a_row_ptr, out_row_ptr, scale_ptr,
    num_rows, N, KD, WN,
    GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DENSE: tl.constexpr,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr, SWIGLU: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GATHER_UNPACK: tl.constexpr,
):
    m_tile = tl.program_id(0)
    n_tile = tl.program_id(1)
    if DENSE:
        expert = 0
        row0 = m_tile * BLOCK_M
        row_end = num_rows
    else:
        expert = tl.load(tile_expert_ptr + m_tile)
        row0 = tl.load(tile_row_ptr + m_tile)
        row_end = tl.load(row_end_ptr + tl.maximum(expert, 0))
    if expert >= 0:   # padding tiles of the tile map carry expert -1
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows = tl.where(row_ok, rows, row0).to(tl.int64)   # padding rows read a valid row
        src = rows
        if GATHER:
            src = tl.load(a_row_ptr + rows).to(tl.int64)
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        pcols = n_tile * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        pc_ok = pcols < N // 8
        qw = qw_ptr + expert * stride_qe
        qz = qz_ptr + expert * stride_ze
        sc = sc_ptr + expert * stride_se
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, KD, BLOCK_K):
            a = tl.load(a_ptr + src[:, None] * stride_am + (k0 + ks)[None, :])
            w = _dequant_tile(qw, qz, sc, k0, WN, pcols, pc_ok, cols, col_ok, GS, BLOCK_K, BLOCK_N,
                              GATHER_UNPACK)
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                w_up = _dequant_tile(qw, qz, sc, k0, WN, pcols + N // 8, pc_ok, cols + N, col_ok,
                                     GS, BLOCK_K, BLOCK_N, GATHER_UNPACK)
                acc_up = tl.dot(a, w_up.to(a.dtype), acc_up, input_precision=DOT_PRECISION)
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        if SCALE:
            acc = acc * tl.load(scale_ptr + rows)[:, None]
        out_rows = rows
        if SCATTER:
            out_rows = tl.load(out_row_ptr + rows).to(tl.int64)
        c_ptrs = c_ptr + out_rows[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
