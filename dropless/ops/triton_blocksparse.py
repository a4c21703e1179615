"""Block-sparse experts (backend "blocksparse"), in the MegaBlocks style.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows (T*K), S slots,
P padded rows, B block size, NB row blocks, NBC column blocks per row block.

Every expert's rows are padded to whole blocks of B rows; the experts then become two products with a
block-sparse matrix over a per-batch topology (built on the device, no host sync):
  1. SDD: [g | u] = x_pad @ [gate_up_0 | ... | gate_up_E-1], computing only the blocks of row block m
     that lie in its expert's 2F columns (block data [NB * 2F/B, B, B]);
  2. h = silu(g) * u on the block data (`triton_swiglu`, as the grouped backend computes it);
  3. DSD: y_pad = h @ [down_0; ...; down_E-1] (sparse times dense, dense out).
Backward: dh = SDD(dy_pad, down^T); ddown = DSD^T (h^T @ dy_pad, per expert); SwiGLU backward on the
blocks (h recomputed, not saved); dx_pad = DSD(d[g | u], gate_up^T); dgate_up = x_pad^T @ d[g | u].
Padding rows of x_pad and dy_pad are zero, so padding never reaches a weight gradient. Dispatch
(token rows -> padded rows) is a gather; combine and the dispatch's backward are the combine kernel
(`triton_combine`): no atomics, deterministic.

Layering: kernels (triton_blocksparse_kernels.py) -> launchers -> custom ops with fake
implementations and autograd -> `blocksparse_experts`. Triton is imported lazily.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dropless.ops import triton_combine, triton_swiglu
from dropless.ops.reference import Plan
from dropless.ops.triton_grouped import _precision

BLOCK = 128   # rows (and sparse columns) per block on the GPU


def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_blocksparse_kernels
    return triton_blocksparse_kernels


def _tiles(block: int) -> dict:
    """Inner tile sizes: BLOCK_K divides the block. The interpreter wants few, large tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_K=min(block, 64), BLOCK_N=64, num_warps=4, num_stages=1)
    return dict(BLOCK_K=64, BLOCK_N=128, num_warps=8, num_stages=3)


def topology(counts_E: Tensor, num_rows: int, block: int = BLOCK):
    """Row blocks per expert, on the device. NB = cdiv(R, B) + E is a static bound on the blocks any
    routing needs (no sync); unused blocks get expert -1 and are skipped by every kernel.
    Returns row_expert_NB (int32), block_start_E (int32), num_blocks_E (int32), and the padded row of
    every expert-contiguous row, pad_row_R (int64)."""
    E = counts_E.numel()
    num_row_blocks = -(-num_rows // block) + E
    blocks_E = (counts_E + block - 1) // block
    block_end_E = torch.cumsum(blocks_E, 0)
    block_start_E = block_end_E - blocks_E
    m_NB = torch.arange(num_row_blocks, device=counts_E.device)
    row_expert = torch.searchsorted(block_end_E, m_NB, right=True)
    row_expert = torch.where(row_expert < E, row_expert, -1)
    row_end_E = torch.cumsum(counts_E, 0)
    r_R = torch.arange(num_rows, device=counts_E.device)
    expert_R = torch.searchsorted(row_end_E, r_R, right=True)
    pad_row_R = block_start_E[expert_R] * block + r_R - (row_end_E - counts_E)[expert_R]
    return (row_expert.to(torch.int32), block_start_E.to(torch.int32), blocks_E.to(torch.int32),
            pad_row_R)


# ---- launchers ------------------------------------------------------------------------------------

def _sdd(a_PK, w_EKN, row_expert, block, halves) -> Tensor:
    """Blocks of a_PK @ w_EKN[e(m)]: data [NB * halves * cdiv(N/halves, B), B, B]."""
    half_n = w_EKN.shape[2] // halves
    half_nbc = -(-half_n // block)
    t = _tiles(block)
    s = a_PK.new_empty(row_expert.numel() * halves * half_nbc, block, block)
    _kernels().sdd_kernel[(s.shape[0],)](
        a_PK, a_PK.stride(0), a_PK.stride(1), w_EKN, *w_EKN.stride(), s, row_expert,
        a_PK.shape[1], half_n, half_nbc, HALVES=halves, DOT_PRECISION=_precision(a_PK),
        B=block, BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"], num_stages=t["num_stages"])
    return s


def _dsd(s, w_EKN, row_expert, block, halves) -> Tensor:
    """c_PN = S @ w_EKN[e(m)] (dense out); rows of unused blocks are left unwritten."""
    N = w_EKN.shape[2]
    half_n = w_EKN.shape[1] // halves
    half_nbc = -(-half_n // block)
    t = _tiles(block)
    c = s.new_empty(row_expert.numel() * block, N)
    _kernels().dsd_kernel[(row_expert.numel() * -(-N // t["BLOCK_N"]),)](
        s, row_expert, w_EKN, *w_EKN.stride(), c, c.stride(0), c.stride(1),
        N, half_n, half_nbc, HALVES=halves, DOT_PRECISION=_precision(s),
        B=block, BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"],
        num_stages=t["num_stages"])
    return c


def _sparse_t_dense(s, b_PN, dw_EFN, block_start, num_blocks, block) -> None:
    """dw_EFN[e] = S_e^T @ b_PN[rows of e]."""
    E, half_n, N = dw_EFN.shape
    half_nbc = -(-half_n // block)
    t = _tiles(block)
    _kernels().sparse_t_dense_kernel[(half_nbc * -(-N // t["BLOCK_N"]), E)](
        s, b_PN, b_PN.stride(0), b_PN.stride(1), dw_EFN, *dw_EFN.stride(), block_start, num_blocks,
        N, half_n, half_nbc, DOT_PRECISION=_precision(s), B=block, BLOCK_N=t["BLOCK_N"],
        BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"], num_stages=t["num_stages"])


def _dense_t_sparse(a_PM, s, dw_EMN, block_start, num_blocks, block, halves) -> None:
    """dw_EMN[e] = a_PM[rows of e]^T @ S_e."""
    E, M, N = dw_EMN.shape
    half_n = N // halves
    half_nbc = -(-half_n // block)
    t = _tiles(block)
    block_m = t["BLOCK_N"]
    _kernels().dense_t_sparse_kernel[(-(-M // block_m) * halves * half_nbc, E)](
        a_PM, a_PM.stride(1), a_PM.stride(0), s, dw_EMN, *dw_EMN.stride(), block_start, num_blocks,
        M, half_n, half_nbc, HALVES=halves, DOT_PRECISION=_precision(a_PM), B=block,
        BLOCK_M=block_m, BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"],
        num_stages=t["num_stages"])


# ---- custom ops -----------------------------------------------------------------------------------

@torch.library.custom_op("dropless::blocksparse_swiglu", mutates_args=())
def _swiglu_op(x_PD: Tensor, row_expert: Tensor, block_start_E: Tensor, num_blocks_E: Tensor,
               gate_up_EDF2: Tensor, down_EFD: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Returns y_PD and, for backward, the [g | u] block data. block_start_E and num_blocks_E (the
    transposed topology) are used by backward only."""
    nb = row_expert.numel()
    gu = _sdd(x_PD, gate_up_EDF2, row_expert, block, halves=2)
    h = triton_swiglu.swiglu(gu.view(nb, -1)).view(-1, block, block)   # [g | u] halves per row block
    return _dsd(h, down_EFD, row_expert, block, halves=1), gu


@_swiglu_op.register_fake
def _(x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD, block):
    nbc = -(-down_EFD.shape[1] // block)
    return (x_PD.new_empty(x_PD.shape[0], down_EFD.shape[2]),
            x_PD.new_empty(row_expert.shape[0] * 2 * nbc, block, block))


@torch.library.custom_op("dropless::blocksparse_swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy_PD: Tensor, x_PD: Tensor, row_expert: Tensor, block_start_E: Tensor,
                        num_blocks_E: Tensor, gate_up_EDF2: Tensor, down_EFD: Tensor, gu: Tensor,
                        block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dx_PD, dgate_up_EDF2, ddown_EFD."""
    nb = row_expert.numel()
    dy_PD = dy_PD.contiguous()
    # 1. down: ddown = h^T @ dy per expert, h recomputed (it lives only for this product)
    h = triton_swiglu.swiglu(gu.view(nb, -1)).view(-1, block, block)
    ddown = torch.empty_like(down_EFD)
    _sparse_t_dense(h, dy_PD, ddown, block_start_E, num_blocks_E, block)
    del h
    # 2. dh = SDD(dy, down^T), then the SwiGLU backward on the blocks
    dh = _sdd(dy_PD, down_EFD.transpose(1, 2), row_expert, block, halves=1)
    dgu = triton_swiglu.swiglu_backward(gu.view(nb, -1), dh.view(nb, -1), want_h=False)
    del dh
    dgu = dgu.view(-1, block, block)
    # 3. gate_up: dx = DSD(d[g | u], gate_up^T); dgate_up = x^T @ d[g | u]
    dx = _dsd(dgu, gate_up_EDF2.transpose(1, 2), row_expert, block, halves=2)
    dgate_up = torch.empty_like(gate_up_EDF2)
    _dense_t_sparse(x_PD, dgu, dgate_up, block_start_E, num_blocks_E, block, halves=2)
    return dx, dgate_up, ddown


@_swiglu_backward_op.register_fake
def _(dy_PD, x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD, gu, block):
    return (x_PD.new_empty(x_PD.shape), gate_up_EDF2.new_empty(gate_up_EDF2.shape),
            down_EFD.new_empty(down_EFD.shape))


def _setup_context(ctx, inputs, output):
    x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD, block = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zero-filled grad for the saved [g | u]
    ctx.save_for_backward(x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD,
                          output[1])
    ctx.block = block


def _backward(ctx, dy_PD, _dgu):
    x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD, gu = ctx.saved_tensors
    dx, dgate_up, ddown = _swiglu_backward_op(dy_PD, x_PD, row_expert, block_start_E, num_blocks_E,
                                              gate_up_EDF2, down_EFD, gu, ctx.block)
    return dx, None, None, None, dgate_up, ddown, None


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


# ---- functional API: dispatch to padded rows, experts, combine --------------------------------------

class _PadRows(torch.autograd.Function):
    """x_PD[pad_row(s)] = x_TD[token(s)] for every slot s; padding rows are zero (they gather an
    appended zero row: one gather, no scatter). Backward: dx_TD[t] = sum_k dx_PD[pad_row(t, k)],
    the combine kernel with unit weights (no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, token_of_pad_P, pad_row_S):
        T, D = x_TD.shape
        x_PD = torch.cat([x_TD, x_TD.new_zeros(1, D)])[token_of_pad_P]
        ctx.save_for_backward(pad_row_S)
        ctx.top_k = pad_row_S.numel() // max(T, 1)
        return x_PD

    @staticmethod
    def backward(ctx, dx_PD):
        (pad_row_S,) = ctx.saved_tensors
        ones_TK = dx_PD.new_ones(pad_row_S.numel() // ctx.top_k, ctx.top_k)
        return triton_combine._launch_combine(dx_PD, ones_TK, pad_row_S, None), None, None


def blocksparse_experts(x_TD: Tensor, plan: Plan, weights_TK: Tensor, gate_up_EDF2: Tensor,
                        down_EFD: Tensor, block: int = BLOCK) -> Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_TD[t]) through the block-sparse products.
    Dropless plans only (every slot has a row)."""
    assert plan.keep_S is None, "the block-sparse path takes dropless plans only"
    T, K = weights_TK.shape
    R = plan.slot_of_row_R.numel()
    row_expert, block_start_E, num_blocks_E, pad_row_R = topology(plan.counts_E, R, block)
    P = row_expert.numel() * block
    pad_row_S = pad_row_R[plan.row_of_slot_S]
    # 1. token rows -> padded expert rows (padding rows read token T: the appended zero row)
    token_of_pad_P = torch.full((P,), T, dtype=torch.int64, device=x_TD.device).scatter_(
        0, pad_row_R, plan.slot_of_row_R // K)
    x_PD = _PadRows.apply(x_TD, token_of_pad_P, pad_row_S)
    # 2. experts: SDD, SwiGLU, DSD
    y_PD, _ = _swiglu_op(x_PD, row_expert, block_start_E, num_blocks_E, gate_up_EDF2, down_EFD,
                         block)
    # 3. combine: each token sums its K rows (padding rows get zero gradient)
    return triton_combine.combine_padded(y_PD, pad_row_S, weights_TK)
