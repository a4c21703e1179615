"""The weighted combine as Triton kernels (CUDA): y_TD[t] = sum_k w[t, k] * y_RD[row(t, k)].

Legend: T tokens, D model dim, K top-k, R routed rows, S slots (t*K + k).

`reference.combine` gathers the rows into slot order (an [R, D] copy) and runs a [1, K] x [K, D]
batched matmul per token, which cuBLAS runs far below memory bandwidth; both backward products
again. Here one kernel reads each expert row once and writes y; backward is one kernel that writes
dy_RD (every row from its one slot) and d(w). Deterministic: no atomics, one writer per element.
Backward keeps y_RD (the experts' output) instead of its slot-order copy.

Layering: kernels (triton_combine_kernels.py) -> launchers -> custom ops with fake implementations and
autograd -> `combine`. Triton is imported lazily.
"""

from __future__ import annotations


import torch
from torch import Tensor

from dropless.ops.reference import Plan

BLOCK_D = 1024


def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_combine_kernels
    return triton_combine_kernels


def _keep(keep_S: Tensor | None, row_of_slot_S: Tensor) -> Tensor:
    return row_of_slot_S if keep_S is None else keep_S.to(torch.int8)


def _launch_combine(y_RD, weights_TK, row_of_slot_S, keep_S) -> Tensor:
    T, K = weights_TK.shape
    D = y_RD.shape[1]
    y_RD, weights_TK = y_RD.contiguous(), weights_TK.contiguous()
    out = y_RD.new_empty(T, D)
    _kernels().combine_kernel[(T, -(-D // BLOCK_D))](
        y_RD, y_RD.stride(0), weights_TK, row_of_slot_S, _keep(keep_S, row_of_slot_S),
        out, out.stride(0), D, K=K, HAS_KEEP=keep_S is not None, BLOCK_D=BLOCK_D)
    return out


@torch.library.custom_op("dropless::combine", mutates_args=())
def _combine_op(y_RD: Tensor, weights_TK: Tensor, row_of_slot_S: Tensor,
                keep_S: Tensor | None, padded: bool) -> Tensor:
    """`padded`: y_RD has rows that no slot reads (block padding); backward gives them zero grad."""
    return _launch_combine(y_RD, weights_TK, row_of_slot_S, keep_S)


@_combine_op.register_fake
def _(y_RD, weights_TK, row_of_slot_S, keep_S, padded):
    return y_RD.new_empty(weights_TK.shape[0], y_RD.shape[1])


@torch.library.custom_op("dropless::combine_backward", mutates_args=())
def _combine_backward_op(dy_TD: Tensor, y_RD: Tensor, weights_TK: Tensor, row_of_slot_S: Tensor,
                         keep_S: Tensor | None, padded: bool) -> tuple[Tensor, Tensor]:
    """Returns dy_RD and d(weights)_TK."""
    T, K = weights_TK.shape
    D = y_RD.shape[1]
    dy_TD, y_RD, weights_TK = dy_TD.contiguous(), y_RD.contiguous(), weights_TK.contiguous()
    dy_RD = torch.zeros_like(y_RD) if padded else torch.empty_like(y_RD)
    dweights_TK = torch.empty_like(weights_TK)
    _kernels().combine_backward_kernel[(T,)](
        dy_TD, dy_TD.stride(0), y_RD, y_RD.stride(0), weights_TK, row_of_slot_S,
        _keep(keep_S, row_of_slot_S), dy_RD, dy_RD.stride(0), dweights_TK, D,
        K=K, HAS_KEEP=keep_S is not None, BLOCK_D=BLOCK_D)
    return dy_RD, dweights_TK


@_combine_backward_op.register_fake
def _(dy_TD, y_RD, weights_TK, row_of_slot_S, keep_S, padded):
    return y_RD.new_empty(y_RD.shape), weights_TK.new_empty(weights_TK.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.keep_S, ctx.padded = inputs[3:]


def _backward(ctx, dy_TD):
    y_RD, weights_TK, row_of_slot_S = ctx.saved_tensors
    dy_RD, dweights_TK = _combine_backward_op(dy_TD, y_RD, weights_TK, row_of_slot_S, ctx.keep_S,
                                              ctx.padded)
    return dy_RD, dweights_TK, None, None, None


_combine_op.register_autograd(_backward, setup_context=_setup_context)


def combine(y_RD: Tensor, plan: Plan, weights_TK: Tensor) -> Tensor:
    """Same function as `reference.combine` (the weights rounded to y's dtype first, as there)."""
    return _combine_op(y_RD, weights_TK.to(y_RD.dtype), plan.row_of_slot_S, plan.keep_S, False)


def combine_padded(y_PD: Tensor, pad_row_S: Tensor, weights_TK: Tensor) -> Tensor:
    """The combine from padded expert rows (block-sparse): padding rows get zero gradient."""
    return _combine_op(y_PD, weights_TK.to(y_PD.dtype), pad_row_S, None, True)


class _Dispatch(torch.autograd.Function):
    """x_RD = x_TD[token(r)]; backward dx_TD[t] = sum_k dx_RD[row(t, k)] is the combine kernel with
    unit weights (one fp32 K-sum, rounded once, as reference.dispatch's backward computes it)."""

    @staticmethod
    def forward(ctx, x_TD, token_of_row_R, row_of_slot_S, keep_S, top_k):
        ctx.save_for_backward(row_of_slot_S, keep_S)
        ctx.top_k = top_k
        return x_TD[token_of_row_R]

    @staticmethod
    def backward(ctx, dx_RD):
        row_of_slot_S, keep_S = ctx.saved_tensors
        ones_TK = dx_RD.new_ones(row_of_slot_S.numel() // ctx.top_k, ctx.top_k)
        return _launch_combine(dx_RD, ones_TK, row_of_slot_S, keep_S), None, None, None, None


def dispatch(x_TD: Tensor, plan: Plan) -> Tensor:
    """Same function as `reference.dispatch`, with the K-sum of its backward in one kernel."""
    return _Dispatch.apply(x_TD, plan.slot_of_row_R // plan.top_k, plan.row_of_slot_S, plan.keep_S,
                           plan.top_k)
