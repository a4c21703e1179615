"""Expert GEMV kernels for decoding: each routed row multiplies its own expert's weights, read in
place by expert id (no gathered copy, no sort).

Shape contract (R routed rows = T*K, D model dim, F expert hidden, E experts):
  gate_up_gemv: x [T, D], ids [R], gate_up [E, D, 2F] -> h [R, F] = silu(x[r // K] @ g) * (x[r // K] @ u)
  down_gemv:    h [R, F], ids [R], down [E, F, D]     -> y [R, D] = h[r] @ down[ids[r]]
One program computes BLOCK_N outputs of one row, looping over the input dim in BLOCK_K chunks;
accumulation in float32, output in the input's dtype. Weights must be contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def gate_up_gemv_kernel(
    # tensors
    x_ptr, ids_ptr, w_ptr, h_ptr,
    # sizes
    D, F, TOP_K,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    expert = tl.load(ids_ptr + row).to(tl.int64)
    x_row = x_ptr + (row // TOP_K).to(tl.int64) * D
    w_expert = w_ptr + expert * D * 2 * F
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        xv = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        tile = w_expert + offs_k[:, None] * (2 * F) + offs_n[None, :]
        mask = k_ok[:, None] & n_ok[None, :]
        g = tl.load(tile, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(tile + F, mask=mask, other=0.0).to(tl.float32)
        acc_g += tl.sum(xv[:, None] * g, axis=0)
        acc_u += tl.sum(xv[:, None] * u, axis=0)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + row.to(tl.int64) * F + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def down_gemv_kernel(
    # tensors
    h_ptr, ids_ptr, w_ptr, y_ptr,
    # sizes
    F, D,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    expert = tl.load(ids_ptr + row).to(tl.int64)
    h_row = h_ptr + row.to(tl.int64) * F
    w_expert = w_ptr + expert * F * D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        hv = tl.load(h_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_expert + offs_k[:, None] * D + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(hv[:, None] * w, axis=0)
    tl.store(y_ptr + row.to(tl.int64) * D + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
