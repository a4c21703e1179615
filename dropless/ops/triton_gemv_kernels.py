"""The GEMV kernel of decoding: a few rows, each through its own matrix (a routed slot through its
expert, read in place by id: no gathered copy, no sort), with plain (bf16/fp16/fp32) or int4 (AWQ
GEMM layout) weights. Imported only by gemv.py's launchers, so that importing dropless never needs
triton.

Legend: R rows, KD reduction length (input features), N output columns of one product, WN the
matrix's full width (2N for gate|up, N otherwise), GS the int4 group size.

Weight contract (per expert, row-major, contiguous inside one expert):
  plain  w [KD, WN];
  int4   qweight int32 [KD, WN/8], qzeros int32 [KD/GS, WN/8], scales fp16/bf16/fp32 [KD/GS, WN];
         w[k, n] = (nibble(qweight[k, n/8], n%8) - nibble(qzeros[k/GS, n/8], n%8)) * scales[k/GS, n],
         column c of a run of eight in nibble (c%2)*4 + c/2 (AutoAWQ's order).
A reduction step covers BLOCK_K rows (inside one group: BLOCK_K divides GS), so one row of zeros and
scales serves the whole tile. Weights are dequantized in registers; accumulation is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dropless.ops.triton_pdl import pdl_start
from dropless.ops.triton_sum_kernels import _sum_tail


@triton.jit
def _spread(v):
    """v [..., n] (int32s of packed columns) repeated eight times in place: [..., 8n]."""
    v = tl.interleave(v, v)
    v = tl.interleave(v, v)
    return tl.interleave(v, v)


@triton.jit
def _shift(cols):
    """The bit offset of each column's nibble in its int32 (AWQ's order)."""
    c = cols % 8
    return ((c % 2) * 4 + c // 2) * 4


@triton.jit
def _group_params(qz_ptr, sc_ptr, g, WN, pcols, pc_ok, cols, col_ok,
                  GATHER_UNPACK: tl.constexpr):
    """(2^23 + zero point, scale), fp32 [BLOCK_N], of group g at columns `cols` (pcols = their
    int32s, cols // 8).

    Two ways to spread each int32 over its eight columns: load it once and repeat it in registers
    (interleave), or let each column load its own copy (the same cache line serves all eight; no
    register shuffle). Which is faster is measured, not assumed: benchmarks/awq.py runs both."""
    if GATHER_UNPACK:
        zp = tl.load(qz_ptr + g * (WN // 8) + cols // 8, mask=col_ok, other=0)
    else:
        zp = _spread(tl.load(qz_ptr + g * (WN // 8) + pcols, mask=pc_ok, other=0))
    z = ((zp >> _shift(cols)) & 0xF).to(tl.float32) + 8388608.0
    s = tl.load(sc_ptr + g * WN + cols, mask=col_ok, other=0.0).to(tl.float32)
    return z, s


@triton.jit
def _dequant_rows(qw_ptr, k0, WN, pcols, pc_ok, cols, col_ok, z, BLOCK_K: tl.constexpr,
                  GATHER_UNPACK: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N]: rows k0..k0+BLOCK_K of the weight before scaling (nibble - zero
    point), all in the group of z (from _group_params)."""
    ks = tl.arange(0, BLOCK_K)
    if GATHER_UNPACK:
        packed = tl.load(qw_ptr + (k0 + ks)[:, None] * (WN // 8) + (cols // 8)[None, :],
                         mask=col_ok[None, :], other=0)
    else:
        packed = _spread(tl.load(qw_ptr + (k0 + ks)[:, None] * (WN // 8) + pcols[None, :],
                                 mask=pc_ok[None, :], other=0))
    # a nibble q becomes the float 2^23 + q by OR-ing it under 2^23's exponent (0x4B000000): one
    # logic op where an int-to-float conversion per weight (a quarter-rate instruction on sm_90)
    # kept the int4 GEMV compute-bound
    q = ((packed >> _shift(cols)[None, :]) & 0xF) | 0x4B000000
    return q.to(tl.float32, bitcast=True) - z[None, :]


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, sc_ptr, k0, WN, pcols, pc_ok, cols, col_ok,
                  GS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  GATHER_UNPACK: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N]: rows k0..k0+BLOCK_K of the weight (inside one group: BLOCK_K
    divides GS)."""
    z, s = _group_params(qz_ptr, sc_ptr, k0 // GS, WN, pcols, pc_ok, cols, col_ok, GATHER_UNPACK)
    return _dequant_rows(qw_ptr, k0, WN, pcols, pc_ok, cols, col_ok, z, BLOCK_K,
                         GATHER_UNPACK) * s[None, :]


@triton.jit
def _row(ptr, k0, KD, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """fp32 [BLOCK_K]: ptr[k0:k0 + BLOCK_K], zero past KD when MASK_K."""
    ks = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:
        v = tl.load(ptr + ks, mask=ks < KD, other=0.0)
    else:
        v = tl.load(ptr + ks)
    return v.to(tl.float32)


@triton.jit
def _program(expert_ptr, rows_per_token, HAS_EXPERT: tl.constexpr):
    """(row, column tile, split, the row's expert (0 without), its x row) of this program."""
    r = tl.program_id(0)
    e = 0
    if HAS_EXPERT:
        e = tl.load(expert_ptr + r).to(tl.int64)
    return r, tl.program_id(1), tl.program_id(2), e, (r // rows_per_token).to(tl.int64)


@triton.jit
def _x_step(x_ptr, stride_xs, row_offset, k0, KD, GU_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
            MASK_K: tl.constexpr):
    """fp32 [BLOCK_K]: a row's x at k0.., or with GU_SPLIT > 0, h = silu(g) * u from the previous
    GEMV's split gate|up partials [GU_SPLIT, *, 2 KD]."""
    if GU_SPLIT > 0:
        g = tl.zeros((BLOCK_K,), dtype=tl.float32)
        u = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for sp in tl.static_range(GU_SPLIT):
            row = x_ptr + sp * stride_xs + row_offset
            g += _row(row, k0, KD, BLOCK_K, MASK_K)
            u += _row(row + KD, k0, KD, BLOCK_K, MASK_K)
        return g * tl.sigmoid(g) * u
    return _row(x_ptr + row_offset, k0, KD, BLOCK_K, MASK_K)


@triton.jit
def _plain_tile(w_ptr, k0, KD, WN, cols, col_ok, BLOCK_K: tl.constexpr, MASK_K: tl.constexpr):
    """fp32 [BLOCK_K, BLOCK_N] of a plain weight at rows k0.., columns `cols` (rows past KD read
    as 0 when MASK_K)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = col_ok[None, :]
    if MASK_K:
        mask = mask & (ks < KD)[:, None]
    return tl.load(w_ptr + ks[:, None] * WN + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def gemv_kernel(
    # x [*, KD]: row r reads row r // rows_per_token. With GU_SPLIT > 0, x holds fp32 gate|up
    # partials [GU_SPLIT, *, 2 KD] instead, summed and passed through SwiGLU as they are read.
    x_ptr, stride_xs, stride_xm, rows_per_token,
    # out [SPLIT_K, R, N] (fp32 partials) or [R, N]
    out_ptr, stride_os, stride_om,
    # weights, one matrix per expert (stride 0 for a single linear); plain: qw_ptr only
    qw_ptr, qz_ptr, sc_ptr, stride_qe, stride_ze, stride_se,
    # per row: expert (any int), scale (any float)
    expert_ptr, scale_ptr,
    # with TOTAL: total [R / slots, N] = (residual [R / slots, N] +) the sum of out over splits and
    # each `slots` consecutive rows, in the last program to arrive (int32 counters cnt)
    total_ptr, res_ptr, cnt_ptr, slots,
    N, KD, WN,
    QUANT: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_EXPERT: tl.constexpr, SCALE: tl.constexpr, SWIGLU: tl.constexpr,
    GU_SPLIT: tl.constexpr, GATHER_UNPACK: tl.constexpr, UNROLL: tl.constexpr,
    MASK_K: tl.constexpr, STAGES: tl.constexpr, TOTAL: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_start(PDL)
    r, n_tile, split, e, src = _program(expert_ptr, rows_per_token, HAS_EXPERT)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    pcols = n_tile * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    pc_ok = pcols < N // 8
    qw, qz, sc = qw_ptr + e * stride_qe, qz_ptr + e * stride_ze, sc_ptr + e * stride_se
    # a multiple of BLOCK_K * UNROLL (the launcher checks), or all of KD (MASK_K, SPLIT_K 1)
    k_len = KD // SPLIT_K
    # 2-D partial sums, reduced over k once after the loop (not a cross-thread reduction per step)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2_up = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    # UNROLL steps per iteration in one basic block: their independent loads are issued together,
    # which is what keeps enough bytes in flight; STAGES > 1 also software-pipelines the loop
    # (Triton stages the next iterations' loads through shared memory)
    for k_outer in tl.range(split * k_len, (split + 1) * k_len, BLOCK_K * UNROLL,
                            num_stages=STAGES):
        if QUANT:   # an iteration stays inside one group (the launcher sees to it): its zero
                    # points and scales once
            z, s = _group_params(qz, sc, k_outer // GS, WN, pcols, pc_ok, cols, col_ok,
                                 GATHER_UNPACK)
            if SWIGLU:
                z_up, s_up = _group_params(qz, sc, k_outer // GS, WN, pcols + N // 8, pc_ok,
                                           cols + N, col_ok, GATHER_UNPACK)
            # the iteration's unscaled products, scaled once at its end
            group = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            group_up = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for step in tl.static_range(UNROLL):
            k0 = k_outer + step * BLOCK_K
            x = _x_step(x_ptr, stride_xs, src * stride_xm, k0, KD, GU_SPLIT, BLOCK_K, MASK_K)
            if QUANT:
                group += x[:, None] * _dequant_rows(qw, k0, WN, pcols, pc_ok, cols, col_ok, z,
                                                    BLOCK_K, GATHER_UNPACK)
            else:
                acc2 += x[:, None] * _plain_tile(qw, k0, KD, WN, cols, col_ok, BLOCK_K, MASK_K)
            if SWIGLU:   # the up columns sit N to the right of the gate columns
                if QUANT:
                    group_up += x[:, None] * _dequant_rows(
                        qw, k0, WN, pcols + N // 8, pc_ok, cols + N, col_ok, z_up, BLOCK_K,
                        GATHER_UNPACK)
                else:
                    acc2_up += x[:, None] * _plain_tile(qw, k0, KD, WN, cols + N, col_ok,
                                                        BLOCK_K, MASK_K)
        if QUANT:
            acc2 += group * s[None, :]
            if SWIGLU:
                acc2_up += group_up * s_up[None, :]
    acc = tl.sum(acc2, axis=0)
    acc_up = tl.sum(acc2_up, axis=0)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if SCALE:
        acc = acc * tl.load(scale_ptr + r).to(tl.float32)
    out = out_ptr + split * stride_os + r * stride_om + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
    if TOTAL:
        _sum_tail(out_ptr, stride_os, stride_om, total_ptr, res_ptr, cnt_ptr, r, n_tile, slots, N,
                  SPLIT_K, HAS_RES, BLOCK_N, BLOCK_J)


@triton.jit
def _rstd(row_ptr, KD, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row x = row_ptr[:KD], in float32."""
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, KD, BLOCK):
        ds = d0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + ds, mask=ds < KD, other=0.0).to(tl.float32)
        sq += x * x
    return tl.rsqrt(tl.sum(sq, axis=0) / KD + eps)


@triton.jit
def _nibble(v, J: tl.constexpr):
    """fp32 2^23 + nibble_J(v) * 16^J (J < 4; the nibble left in place), by its bits: one logic
    op per weight (AND then OR, one LOP3), no shift, no int-to-float conversion. Exact: the
    nibble sits in the mantissa's low 16 bits."""
    return ((v & (0xF << (4 * J))) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _zero_scale(zp, sc_ptr, g, WN, pcols, pc_ok, J: tl.constexpr, HI: tl.constexpr):
    """(2^23 + zero * 16^J, scale / 16^J), fp32 [BLOCK_N / 8], of nibble J + 4 HI of the
    int32s pcols (zp: their packed zero points, shifted right by 16 when HI): column
    8 pcol + 2 J + HI in AWQ's order."""
    s = tl.load(sc_ptr + g * WN + pcols * 8 + (2 * J + HI), mask=pc_ok, other=0.0)
    return _nibble(zp, J), s.to(tl.float32) * (1.0 / (1 << (4 * J)))


@triton.jit
def _store_nibble(out, acc2, pcols, pc_ok, scale, J: tl.constexpr, HI: tl.constexpr):
    tl.store(out + pcols * 8 + (2 * J + HI), (tl.sum(acc2, axis=0) * scale).to(
        out.dtype.element_ty), mask=pc_ok)


@triton.jit
def gemv_nibble_kernel(
    x_ptr, stride_xs, stride_xm, rows_per_token,
    out_ptr, stride_os, stride_om,
    qw_ptr, qz_ptr, sc_ptr, stride_qe, stride_ze, stride_se,
    expert_ptr, scale_ptr,
    total_ptr, res_ptr, cnt_ptr, slots,
    N, KD, WN,
    GS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_EXPERT: tl.constexpr, SCALE: tl.constexpr, GU_SPLIT: tl.constexpr,
    UNROLL: tl.constexpr, STAGES: tl.constexpr, TOTAL: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_J: tl.constexpr,
    # NORM: x is first F.rms_norm(x, norm_w, eps) (rounded to x's dtype), each program taking its
    # row's statistics over all of KD (NORM_BLOCK at a time; a few KB that stay in L2)
    norm_ptr=None, eps=0.0, NORM: tl.constexpr = False, NORM_BLOCK: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """gemv_kernel's int4 product (no SwiGLU epilogue) in the weights' packed order: nibble j of
    every int32 is a [BLOCK_K, BLOCK_N / 8] tile of its own (column 8 p + AWQ_ORDER[j]) with its
    own accumulator, so no int32 is spread over columns in registers (no shuffles, no per-column
    shift): a weight costs one LOP3, one FADD (the zero point) and one FFMA. Nibbles 0-3 are read
    in place, 4-7 from the int32 shifted right by 16 (one shift per eight weights); the power of
    16 each keeps is folded into its scale."""
    pdl_start(PDL)
    r, n_tile, split, e, src = _program(expert_ptr, rows_per_token, HAS_EXPERT)
    pcols = n_tile * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    pc_ok = pcols < N // 8
    ks = tl.arange(0, BLOCK_K)
    qw, qz, sc = qw_ptr + e * stride_qe, qz_ptr + e * stride_ze, sc_ptr + e * stride_se
    k_len = KD // SPLIT_K   # a multiple of BLOCK_K * UNROLL, an iteration inside one group
    if NORM:
        rstd = _rstd(x_ptr + src * stride_xm, KD, eps, NORM_BLOCK)
    a0 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a4 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a5 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a6 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    a7 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
    for k_outer in tl.range(split * k_len, (split + 1) * k_len, BLOCK_K * UNROLL,
                            num_stages=STAGES):
        g = k_outer // GS
        zp = tl.load(qz + g * (WN // 8) + pcols, mask=pc_ok, other=0)
        zh = zp >> 16
        z0, s0 = _zero_scale(zp, sc, g, WN, pcols, pc_ok, 0, 0)
        z1, s1 = _zero_scale(zp, sc, g, WN, pcols, pc_ok, 1, 0)
        z2, s2 = _zero_scale(zp, sc, g, WN, pcols, pc_ok, 2, 0)
        z3, s3 = _zero_scale(zp, sc, g, WN, pcols, pc_ok, 3, 0)
        z4, s4 = _zero_scale(zh, sc, g, WN, pcols, pc_ok, 0, 1)
        z5, s5 = _zero_scale(zh, sc, g, WN, pcols, pc_ok, 1, 1)
        z6, s6 = _zero_scale(zh, sc, g, WN, pcols, pc_ok, 2, 1)
        z7, s7 = _zero_scale(zh, sc, g, WN, pcols, pc_ok, 3, 1)
        # the iteration's unscaled products, scaled once at its end
        p0 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p1 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p2 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p3 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p4 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p5 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p6 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        p7 = tl.zeros((BLOCK_K, BLOCK_N // 8), dtype=tl.float32)
        for step in tl.static_range(UNROLL):
            k0 = k_outer + step * BLOCK_K
            x = _x_step(x_ptr, stride_xs, src * stride_xm, k0, KD, GU_SPLIT, BLOCK_K, False)
            if NORM:   # rounded to x's dtype, as F.rms_norm's output is
                nw = tl.load(norm_ptr + k0 + ks).to(tl.float32)
                x = (x * rstd * nw).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = x[:, None]
            lo = tl.load(qw + (k0 + ks)[:, None] * (WN // 8) + pcols[None, :],
                         mask=pc_ok[None, :], other=0)
            hi = lo >> 16
            p0 += x * (_nibble(lo, 0) - z0[None, :])
            p1 += x * (_nibble(lo, 1) - z1[None, :])
            p2 += x * (_nibble(lo, 2) - z2[None, :])
            p3 += x * (_nibble(lo, 3) - z3[None, :])
            p4 += x * (_nibble(hi, 0) - z4[None, :])
            p5 += x * (_nibble(hi, 1) - z5[None, :])
            p6 += x * (_nibble(hi, 2) - z6[None, :])
            p7 += x * (_nibble(hi, 3) - z7[None, :])
        a0 += p0 * s0[None, :]
        a1 += p1 * s1[None, :]
        a2 += p2 * s2[None, :]
        a3 += p3 * s3[None, :]
        a4 += p4 * s4[None, :]
        a5 += p5 * s5[None, :]
        a6 += p6 * s6[None, :]
        a7 += p7 * s7[None, :]
    scale = 1.0
    if SCALE:
        scale = tl.load(scale_ptr + r).to(tl.float32)
    out = out_ptr + split * stride_os + r * stride_om
    _store_nibble(out, a0, pcols, pc_ok, scale, 0, 0)
    _store_nibble(out, a1, pcols, pc_ok, scale, 1, 0)
    _store_nibble(out, a2, pcols, pc_ok, scale, 2, 0)
    _store_nibble(out, a3, pcols, pc_ok, scale, 3, 0)
    _store_nibble(out, a4, pcols, pc_ok, scale, 0, 1)
    _store_nibble(out, a5, pcols, pc_ok, scale, 1, 1)
    _store_nibble(out, a6, pcols, pc_ok, scale, 2, 1)
    _store_nibble(out, a7, pcols, pc_ok, scale, 3, 1)
    if TOTAL:
        _sum_tail(out_ptr, stride_os, stride_om, total_ptr, res_ptr, cnt_ptr, r, n_tile, slots, N,
                  SPLIT_K, HAS_RES, BLOCK_N, BLOCK_J)
