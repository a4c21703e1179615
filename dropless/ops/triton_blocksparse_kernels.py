"""Triton kernels of the block-sparse experts. Imported only by `triton_blocksparse.py`'s launchers, so
that importing dropless never needs triton.

Legend: P padded rows (every expert's rows padded to whole row blocks), D model dim, F expert hidden,
E experts, B block size, NB row blocks, NBC column blocks per row block (F/B, or 2F/B for [g | u]).

A block-sparse matrix S [P, E*NBC*B] is stored as its nonzero blocks, data [NB*NBC, B, B]: row block
m holds exactly the NBC column blocks of its expert e(m), in order, at data[m*NBC : (m+1)*NBC]. So
the topology is the row blocks' experts (`row_expert_ptr`, -1 for unused blocks) and, per expert,
its first row block and block count (the transposed topology: column block j of expert e is
nonzero in exactly those row blocks). A sparse column c of a block belongs to half c // HALF_N
(gate or up) when a GLU keeps both halves in one matrix; columns past F inside a half are padding
(zero in every block). Every output element is written by exactly one program: no atomics.

- `sdd_kernel`: S = A @ W, only the topology's blocks (first projection; dh in backward).
- `dsd_kernel`: C = S @ W, dense out (second projection; dx in backward).
- `sparse_t_dense_kernel`: dW_e = S_e^T @ B_e; `dense_t_sparse_kernel`: dW_e = A_e^T @ S_e (weight
  gradients, reducing over each expert's row blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sdd_kernel(
    # A [P, KD] dense; W [E, KD, HALVES*HALF_N] any strides; S data [NB*NBC, B, B]
    a_ptr, stride_am, stride_ak,
    w_ptr, stride_we, stride_wk, stride_wn,
    s_ptr, row_expert_ptr,
    KD, HALF_N, HALF_NBC,
    HALVES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    nbc = HALVES * HALF_NBC
    m = blk // nbc
    j = blk % nbc
    expert = tl.load(row_expert_ptr + m)
    if expert >= 0:
        # 1. this block's rows, and its columns in W (the half, then the offset inside it)
        rows = m * B + tl.arange(0, B)
        col_in = (j % HALF_NBC) * B + tl.arange(0, B)
        cols = (j // HALF_NBC) * HALF_N + col_in
        col_ok = col_in < HALF_N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk
                  + cols[None, :] * stride_wn)
        acc = tl.zeros((B, B), dtype=tl.float32)
        # 2. reduction over KD; padding columns load zeros, so the block stores zeros there
        for k in range(0, KD, BLOCK_K):
            k_ok = ks < KD - k
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        offs = tl.arange(0, B)
        s_ptrs = s_ptr + blk * B * B + offs[:, None] * B + offs[None, :]
        tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty))


@triton.jit
def dsd_kernel(
    # S data [NB*NBC, B, B]; W [E, HALVES*HALF_N, N] any strides (row = sparse column); C [P, N]
    s_ptr, row_expert_ptr,
    w_ptr, stride_we, stride_wk, stride_wn,
    c_ptr, stride_cm, stride_cn,
    N, HALF_N, HALF_NBC,
    HALVES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # column tiles vary fastest: the programs of one row block run together and share its blocks in
    # L2 (row blocks fastest re-read every block from memory once per column tile: 4x slower)
    num_n = tl.cdiv(N, BLOCK_N)
    m = (tl.program_id(0) // num_n).to(tl.int64)
    expert = tl.load(row_expert_ptr + m)
    if expert >= 0:
        nbc = HALVES * HALF_NBC
        offs = tl.arange(0, B)
        cols = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((B, BLOCK_N), dtype=tl.float32)
        # reduction over the row block's NBC blocks, BLOCK_K columns of a block at a time
        for kk in range(0, nbc * B, BLOCK_K):
            j = kk // B
            k_in = (j % HALF_NBC) * B + kk % B + ks          # column inside its half
            w_rows = (j // HALF_NBC) * HALF_N + k_in
            s = tl.load(s_ptr + (m * nbc + j) * B * B + offs[:, None] * B + (kk % B + ks)[None, :])
            w = tl.load(w_ptr + expert.to(tl.int64) * stride_we + w_rows[:, None] * stride_wk
                        + cols[None, :] * stride_wn,
                        mask=(k_in < HALF_N)[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(s, w, acc, input_precision=DOT_PRECISION)
        rows = m * B + offs
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def sparse_t_dense_kernel(
    # S data [NB*NBC, B, B] (NBC = HALF_NBC: one half); Bm [P, N] dense; dW [E, HALF_N, N]
    s_ptr, b_ptr, stride_bm, stride_bn,
    dw_ptr, stride_de, stride_dk, stride_dn,
    block_start_ptr, num_blocks_ptr,
    N, HALF_N, HALF_NBC,
    DOT_PRECISION: tl.constexpr,
    B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    j = tl.program_id(0) // num_n                     # the sparse column block: rows of dW_e
    cols = (tl.program_id(0) % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    first = tl.load(block_start_ptr + expert).to(tl.int64)
    steps = tl.load(num_blocks_ptr + expert) * (B // BLOCK_K)
    offs = tl.arange(0, B)
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((B, BLOCK_N), dtype=tl.float32)
    # an expert with no row blocks writes zeros: its gradient is exactly zero
    for it in range(0, steps):
        m = first + it // (B // BLOCK_K)
        r = (it % (B // BLOCK_K)) * BLOCK_K + rs         # rows inside the block
        s_t = tl.load(s_ptr + (m * HALF_NBC + j) * B * B + offs[:, None] + r[None, :] * B)
        b = tl.load(b_ptr + (m * B + r)[:, None] * stride_bm + cols[None, :] * stride_bn,
                    mask=col_ok[None, :], other=0.0)
        acc = tl.dot(s_t, b, acc, input_precision=DOT_PRECISION)
    k_in = j * B + offs
    tl.store(dw_ptr + expert.to(tl.int64) * stride_de + k_in[:, None] * stride_dk
             + cols[None, :] * stride_dn, acc.to(dw_ptr.dtype.element_ty),
             mask=(k_in < HALF_N)[:, None] & col_ok[None, :])


@triton.jit
def dense_t_sparse_kernel(
    # A [P, M] dense (stride_am along M, stride_ak along P); S data [NB*NBC, B, B]; dW [E, M, 2F]
    a_ptr, stride_am, stride_ak, s_ptr,
    dw_ptr, stride_de, stride_dm, stride_dn,
    block_start_ptr, num_blocks_ptr,
    M, HALF_N, HALF_NBC,
    HALVES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(1)
    nbc = HALVES * HALF_NBC
    j = tl.program_id(0) % nbc                        # the sparse column block: columns of dW_e
    ms = (tl.program_id(0) // nbc) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    first = tl.load(block_start_ptr + expert).to(tl.int64)
    steps = tl.load(num_blocks_ptr + expert) * (B // BLOCK_K)
    offs = tl.arange(0, B)
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for it in range(0, steps):
        m = first + it // (B // BLOCK_K)
        r = (it % (B // BLOCK_K)) * BLOCK_K + rs
        a_t = tl.load(a_ptr + ms[:, None] * stride_am + (m * B + r)[None, :] * stride_ak,
                      mask=m_ok[:, None], other=0.0)
        s = tl.load(s_ptr + (m * nbc + j) * B * B + r[:, None] * B + offs[None, :])
        acc = tl.dot(a_t, s, acc, input_precision=DOT_PRECISION)
    col_in = (j % HALF_NBC) * B + offs
    cols = (j // HALF_NBC) * HALF_N + col_in
    tl.store(dw_ptr + expert.to(tl.int64) * stride_de + ms[:, None].to(tl.int64) * stride_dm
             + cols[None, :] * stride_dn, acc.to(dw_ptr.dtype.element_ty),
             mask=m_ok[:, None] & (col_in < HALF_N)[None, :])
