"""Launcher of the decode step's dense projections (triton_linear_kernels.py): at a few tokens, an
nn.Linear as one GEMV over its weight as stored, with the RMSNorm before it and the residual add
after it in the same launch. At batch 1 the BLAS GEMM of a [1, K] row is a tiled matrix product
with most of its tile empty, plus a split-K reduction kernel; here each program reads whole
contiguous weight rows. Inference only (no autograd); no host sync and shapes fixed by the
inputs, so CUDA graphs capture it; the torch ops stay the reference (dropless/serve/decode.py).

Legend: T tokens, K input features, N output features.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dropless.ops.device import num_sms, pdl_launch, pow2
from dropless.ops.gemv import stages

# Rows where decode uses it: the tile holds every row (weights read once). On an H100 at T = 1
# the kernel beat BLAS (rms_norm + F.linear; addmm) 1.1-1.4x at the medium and Qwen3-30B-A3B
# shapes; at T = 2 the Qwen3 q|k|v stack was 0.92x and o_proj 1.16x, past that slower
# (benchmarks/results/h100_r16/call1_linear_*.log)
MAX_TOKENS = 2
MAX_ROWS = 8   # what one launch takes (its register tile)
# Each program accumulates BLOCK_T x BLOCK_N x BLOCK_K float32 products (TILE: 32 registers a
# thread at 4 warps); output blocks shrink until the grid holds WAVES programs per
# multiprocessor; UNROLL reduction steps are loaded together. The best of a 24-point sweep at the
# Qwen3-30B-A3B shapes, T = 1, on an H100 (benchmarks/decode_linear.py; within ~10%: the rest)
TILE = 4096
MAX_BLOCK_N = 16
WAVES = 8
UNROLL = 8
NUM_WARPS = 4


@functools.cache
def _kernel():
    from dropless.ops.triton_linear_kernels import linear_rows_kernel
    return linear_rows_kernel



def _num_sms(device: torch.device) -> int:
    return num_sms(device.index) if device.type == "cuda" else 1


def tiles(T: int, N: int, K: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K, UNROLL) for `sms` multiprocessors."""
    block_t = pow2(T)
    block_n = MAX_BLOCK_N
    while block_n > 2 and -(-N // block_n) < WAVES * sms:
        block_n //= 2
    block_k = max(16, min(pow2(K), TILE // (block_t * block_n)))
    return block_t, block_n, block_k, max(1, min(UNROLL, -(-K // block_k)))


@torch.library.custom_op("dropless::linear_rows", mutates_args=())
def linear_rows(x_TK: Tensor, weight_NK: Tensor, norm_weight: Tensor | None, eps: float,
                residual_TN: Tensor | None) -> Tensor:
    """(residual +) rms_norm(x) @ W^T for T <= MAX_ROWS rows, in x's dtype: the norm (when
    norm_weight [K] is given: F.rms_norm(x, norm_weight, eps), rounded to x's dtype) and the
    residual add [T, N] in the GEMV's launch. W [N, K] as nn.Linear holds it."""
    T, K = x_TK.shape
    N = weight_NK.shape[0]
    assert weight_NK.shape[1] == K and 1 <= T <= MAX_ROWS
    if x_TK.stride(1) != 1:
        x_TK = x_TK.contiguous()
    weight_NK = weight_NK.contiguous()
    out = x_TK.new_empty(T, N)
    assert norm_weight is None or norm_weight.shape == (K,)
    assert residual_TN is None or residual_TN.shape == (T, N)
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    if residual_TN is not None and residual_TN.stride(1) != 1:
        residual_TN = residual_TN.contiguous()
    block_t, block_n, block_k, unroll = tiles(T, N, K, _num_sms(x_TK.device))
    _kernel()[(-(-N // block_n), -(-T // block_t))](
        x_TK, weight_NK, x_TK if norm_weight is None else norm_weight,
        out if residual_TN is None else residual_TN, out, T, N, K, x_TK.stride(0),
        0 if residual_TN is None else residual_TN.stride(0), eps,
        NORM=norm_weight is not None, RES=residual_TN is not None, BLOCK_T=block_t,
        BLOCK_N=block_n, BLOCK_K=block_k, UNROLL=unroll, STAGES=stages("linear"),
        num_warps=NUM_WARPS, **pdl_launch(x_TK.device, preload=True))
    return out


@linear_rows.register_fake
def _(x_TK, weight_NK, norm_weight, eps, residual_TN):
    return x_TK.new_empty(x_TK.shape[0], weight_NK.shape[0])
