"""Triton kernels of the fused grouped experts. Imported only by `triton_grouped.py`'s launchers, so
that importing dropless never needs triton.

Legend: T tokens, D model dim, F expert hidden, E experts, R routed rows (expert-contiguous, T*K),
N output columns of one product, KD its reduction length.

Two kernels serve every product of the forward and backward pass:
- `grouped_mm_kernel`: C[out_row(r)] = epilogue(A[a_row(r)] @ W[e(r)]) over expert-contiguous rows.
  A persistent grid walks (row tile, column tile) pairs; a row tile never spans two experts (the tile
  map pads every expert to whole tiles, and padding tiles are skipped). Epilogues: plain (optionally
  scaled by a per-row factor), SwiGLU (gate and up accumulated in one pass), SwiGLU backward.
- `grouped_wgrad_kernel`: dW[e] = A_e^T @ B_e, reducing over the variable number of rows of expert e.
Every output element is written by exactly one program: no atomics, bitwise-reproducible results.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

EPI_PLAIN, EPI_SWIGLU, EPI_SWIGLU_BWD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter is slow with small blocks and gains nothing from tuning
    _MM_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4})]
    _WG_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})]
elif os.environ.get("DROPLESS_TRITON_AUTOTUNE") == "0":
    # one good config, no tuning: quick compiles for GPU tests
    _MM_CONFIGS = [triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8,
                                 num_stages=3)]
    _WG_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8,
                                 num_stages=3)]
else:
    _MM_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4)]
    ]
    _WG_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
                                 (64, 128, 64, 4, 4)]
    ]
# the narrowest column tile any config may pick: the launcher sizes per-tile partial sums by it
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _MM_CONFIGS)


@triton.autotune(configs=_MM_CONFIGS, key=["N", "KD", "EPILOGUE"])
@triton.heuristics({"EVEN_K": lambda a: a["KD"] % a["BLOCK_K"] == 0,
                    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def grouped_mm_kernel(
    # A [*, KD], rows read through a_row when GATHER_A; W [E, KD, N'] with any strides
    a_ptr, stride_am, stride_ak,
    w_ptr, stride_we, stride_wk, stride_wn,
    # C: [*, N] (plain, SwiGLU's h) or [R, 2N] (SwiGLU backward: dgate | dup), rows through out_row
    c_ptr, stride_cm, stride_cn,
    # gu [R, 2N]: stored by the SwiGLU epilogue, read by its backward
    gu_ptr, stride_gm, stride_gn,
    # routing metadata: tile map (expert, first row) per row tile, row end per expert
    tile_expert_ptr, tile_row_ptr, row_end_ptr,
    a_row_ptr, out_row_ptr, scale_ptr,   # int [R], int [R], fp32 [R]
    dscale_ptr,                          # fp32 [num column tiles, R]: SwiGLU backward's d(scale)
    R, N, KD, num_m_tiles,
    EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr,
    SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m_tiles * num_n_tiles
    for tile in tl.range(pid, num_tiles, tl.num_programs(0)):
        # 1. grouped order: GROUP_M row tiles share each column tile of W while it is in L2
        per_group = GROUP_M * num_n_tiles
        first_m = (tile // per_group) * GROUP_M
        size_m = min(num_m_tiles - first_m, GROUP_M)
        m_tile = first_m + (tile % per_group) % size_m
        n_tile = (tile % per_group) // size_m
        expert = tl.load(tile_expert_ptr + m_tile)
        if expert >= 0:
            row0 = tl.load(tile_row_ptr + m_tile)
            row_end = tl.load(row_end_ptr + expert)
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            rows = tl.where(row_ok, rows, row0).to(tl.int64)   # padding rows read a valid row
            if GATHER_A:
                src = tl.load(a_row_ptr + rows).to(tl.int64)
            else:
                src = rows
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            ks = tl.arange(0, BLOCK_K)
            # 2. main loop over the reduction; gate and up share the A tile in the SwiGLU pass
            a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
            w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk
                      + cols[None, :] * stride_wn)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # masks along a contiguous dimension would break 16-byte vector loads: only when ragged
            for k in range(0, KD, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=(ks < KD - k)[None, :], other=0.0)
                if EVEN_K and EVEN_N:
                    w = tl.load(w_ptrs)
                else:
                    w_ok = (ks < KD - k)[:, None] & col_ok[None, :]
                    w = tl.load(w_ptrs, mask=w_ok, other=0.0)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
                if EPILOGUE == EPI_SWIGLU:
                    if EVEN_K and EVEN_N:
                        w_up = tl.load(w_ptrs + N * stride_wn)
                    else:
                        w_up = tl.load(w_ptrs + N * stride_wn, mask=w_ok, other=0.0)
                    acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                w_ptrs += BLOCK_K * stride_wk
            # 3. epilogue
            if EVEN_N:
                mask = row_ok[:, None]   # broadcast over columns: stores stay vectorized
            else:
                mask = row_ok[:, None] & col_ok[None, :]
            if SCATTER_OUT:
                out_rows = tl.load(out_row_ptr + rows).to(tl.int64)
            else:
                out_rows = rows
            c_ptrs = c_ptr + out_rows[:, None] * stride_cm + cols[None, :] * stride_cn
            gu_ptrs = gu_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn
            if EPILOGUE == EPI_PLAIN:
                if SCALE:
                    acc = acc * tl.load(scale_ptr + rows)[:, None]
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
            elif EPILOGUE == EPI_SWIGLU:
                # keep the rounded pre-activations for backward; h is computed from them
                g = acc.to(gu_ptr.dtype.element_ty)
                u = acc_up.to(gu_ptr.dtype.element_ty)
                tl.store(gu_ptrs, g, mask=mask)
                tl.store(gu_ptrs + N * stride_gn, u, mask=mask)
                g = g.to(tl.float32)
                h = g * tl.sigmoid(g) * u.to(tl.float32)
                tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=mask)
            else:
                # acc = dy[token] @ down_e^T = d(h) before the routing weight w
                g = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
                u = tl.load(gu_ptrs + N * stride_gn, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(g)
                silu = g * sig
                # d(w) = <dy, y_unweighted> = <acc, h>, partial over this column tile
                tl.store(dscale_ptr + n_tile * R + rows, tl.sum(acc * silu * u, axis=1),
                         mask=row_ok)
                dh = acc * tl.load(scale_ptr + rows)[:, None]
                dg = dh * u * sig * (1.0 + g * (1.0 - sig))
                du = dh * silu
                tl.store(c_ptrs, dg.to(c_ptr.dtype.element_ty), mask=mask)
                tl.store(c_ptrs + N * stride_cn, du.to(c_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_WG_CONFIGS, key=["M", "N"])
@triton.heuristics({"EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
                    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit
def grouped_wgrad_kernel(
    # A [*, M] and B [*, N], rows read through a_row / b_row; B rows scaled by scale (fp32 [R])
    a_ptr, stride_ar, stride_am,
    b_ptr, stride_br, stride_bn,
    # dW [E, M, N]
    dw_ptr, stride_de, stride_dm, stride_dn,
    row_end_ptr, counts_ptr, a_row_ptr, b_row_ptr, scale_ptr,
    M, N,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    ms = (pid // num_n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % num_n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    end = tl.load(row_end_ptr + expert)
    start = end - tl.load(counts_ptr + expert)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # an expert with no rows writes zeros: its gradient is exactly zero
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < end
        rows = tl.where(row_ok, rows, start).to(tl.int64)
        if GATHER_A:
            a_rows = tl.load(a_row_ptr + rows).to(tl.int64)
        else:
            a_rows = rows
        if GATHER_B:
            b_rows = tl.load(b_row_ptr + rows).to(tl.int64)
        else:
            b_rows = rows
        # rows past the expert's end are masked (a non-contiguous dim: loads stay vectorized);
        # columns only when ragged
        a_ptrs = a_ptr + a_rows[None, :] * stride_ar + ms[:, None] * stride_am   # [BLOCK_M, BLOCK_K]
        b_ptrs = b_ptr + b_rows[:, None] * stride_br + ns[None, :] * stride_bn   # [BLOCK_K, BLOCK_N]
        if EVEN_M:
            a = tl.load(a_ptrs)   # rows past the end are zeroed through b alone
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        if EVEN_N:
            b = tl.load(b_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if SCALE:
            b = (b.to(tl.float32) * tl.load(scale_ptr + rows)[:, None]).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    dw_ptrs = (dw_ptr + expert.to(tl.int64) * stride_de + ms[:, None].to(tl.int64) * stride_dm
               + ns[None, :] * stride_dn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
