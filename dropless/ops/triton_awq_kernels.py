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
  column tiles, tl.dot on the dequantized tile in the activation dtype. With PACKED (opt-in,
  DROPLESS_AWQ_GROUPED_PACKED: awq.py) a tile is dequantized nibble by nibble in packed order,
  as the GEMV's, and only then joined into column order in registers; the scales multiply the
  dot's result, not every weight.
- decode (a few rows) runs the GEMV kernel of triton_gemv_kernels.py, which reads plain or int4
  weights with the same `_dequant_tile`.
It can fuse SwiGLU (gate and up columns in one pass) and a per-row scale (routing weight).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dropless.ops.triton_gemv_kernels import _dequant_tile, _nibble


@triton.jit
def _columns(v0, v1, v2, v3, v4, v5, v6, v7):
    """[..., n, 2, 2, 2], read as [..., 8 n] in column order, from the eight nibbles' [..., n]
    tiles in packed order: column 8 i + c of a run is nibble (c % 2) * 4 + c // 2 (AWQ's order).
    Each join adds the fastest axis, so the slowest of c's three bits is joined first; all in
    registers, no shuffle. (The caller reshapes: Triton's compiler takes no starred shapes.)"""
    bit2 = tl.join(tl.join(v0, v2), tl.join(v1, v3))   # columns 0, 2, 4, 6: [.., 2 (c/4), 2]
    odd = tl.join(tl.join(v4, v6), tl.join(v5, v7))    # columns 1, 3, 5, 7
    return tl.join(bit2, odd)


@triton.jit
def _packed_group(qz_ptr, sc_ptr, g, WN, pcols, pc_ok, cols, col_ok, BLOCK_N: tl.constexpr):
    """(2^23 + zero * 16^J, scale / 16^J), fp32 [BLOCK_N] in column order, of group g: J the
    nibble's place in its 16-bit half (the power of 16 a nibble keeps, _nibble)."""
    zp = tl.load(qz_ptr + g * (WN // 8) + pcols, mask=pc_ok, other=0)
    zh = zp >> 16
    z = _columns(_nibble(zp, 0), _nibble(zp, 1), _nibble(zp, 2), _nibble(zp, 3),
                 _nibble(zh, 0), _nibble(zh, 1), _nibble(zh, 2), _nibble(zh, 3))
    z = tl.reshape(z, (BLOCK_N,))
    s = tl.load(sc_ptr + g * WN + cols, mask=col_ok, other=0.0).to(tl.float32)
    return z, s * tl.exp2(-4.0 * ((cols % 8) // 2).to(tl.float32))


@triton.jit
def _packed_rows(qw_ptr, k0, WN, pcols, pc_ok, z, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N]: (nibble - zero) * 16^J at rows k0.., exact (an integer of at most
    four bits times a power of two: exact in bf16 and fp16 too). One logic op and one subtraction
    per weight, one shift per eight."""
    ks = k0 + tl.arange(0, BLOCK_K)
    lo = tl.load(qw_ptr + ks[:, None] * (WN // 8) + pcols[None, :], mask=pc_ok[None, :], other=0)
    hi = lo >> 16
    q = _columns(_nibble(lo, 0), _nibble(lo, 1), _nibble(lo, 2), _nibble(lo, 3),
                 _nibble(hi, 0), _nibble(hi, 1), _nibble(hi, 2), _nibble(hi, 3))
    return tl.reshape(q, (BLOCK_K, BLOCK_N)) - z[None, :]


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
    DOT_PRECISION: tl.constexpr, GATHER_UNPACK: tl.constexpr, PACKED: tl.constexpr = False,
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
            if PACKED:   # the step's unscaled product, scaled per column after the dot
                z, s = _packed_group(qz, sc, k0 // GS, WN, pcols, pc_ok, cols, col_ok, BLOCK_N)
                w = _packed_rows(qw, k0, WN, pcols, pc_ok, z, BLOCK_K, BLOCK_N)
                acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * s[None, :]
            else:
                w = _dequant_tile(qw, qz, sc, k0, WN, pcols, pc_ok, cols, col_ok, GS, BLOCK_K,
                                  BLOCK_N, GATHER_UNPACK)
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
            if SWIGLU:   # the up columns sit N to the right of the gate columns
                if PACKED:
                    z, s = _packed_group(qz, sc, k0 // GS, WN, pcols + N // 8, pc_ok, cols + N,
                                         col_ok, BLOCK_N)
                    w = _packed_rows(qw, k0, WN, pcols + N // 8, pc_ok, z, BLOCK_K, BLOCK_N)
                    acc_up += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION) * s[None, :]
                else:
                    w = _dequant_tile(qw, qz, sc, k0, WN, pcols + N // 8, pc_ok, cols + N,
                                      col_ok, GS, BLOCK_K, BLOCK_N, GATHER_UNPACK)
                    acc_up = tl.dot(a, w.to(a.dtype), acc_up, input_precision=DOT_PRECISION)
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        if SCALE:
            acc = acc * tl.load(scale_ptr + rows)[:, None]
        out_rows = rows
        if SCATTER:
            out_rows = tl.load(out_row_ptr + rows).to(tl.int64)
        c_ptrs = c_ptr + out_rows[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
