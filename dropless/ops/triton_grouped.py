"""Fused grouped experts (backend "triton"): gather -> gate|up -> SwiGLU -> down -> weighted scatter.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows (expert-contiguous,
T*K), S slots (t*K + k), M row tiles.

Forward, two grouped products and no permuted copy of x:
  1. h_RF = silu(g) * u, [g | u] = x[token(r)] @ gate_up[e(r)]: the token rows are gathered inside the
     product's loads; gate and up come out of one pass; [g | u] is kept for backward.
  2. y_SD[slot(r)] = w(r) * (h_RF[r] @ down[e(r)]): the routing weight and the scatter to slot order
     happen in the epilogue; y_TD = y_SD.view(T, K, D).sum(1), a deterministic K-sum (no atomics).
Backward, four products: d[g | u] (with the SwiGLU backward and d(weights) in its epilogue), dx
(scattered to slots, then the K-sum), and the two weight gradients reduced per expert.

Layering: kernels (triton_grouped_kernels.py) -> launchers here -> custom ops with fake
implementations and autograd -> `fused_experts` (functional API). Triton is imported lazily, inside
the launchers, so this module imports without it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dropless.ops.device import has_triton, num_sms
from dropless.ops.reference import Plan

BLOCK_M = 128   # rows per tile; the tile map pads every expert to whole tiles of this many rows
# epilogue codes of grouped_mm_kernel, mirrored here so that this module imports without triton
_EPI_PLAIN, _EPI_SWIGLU, _EPI_SWIGLU_BWD = 0, 1, 2


def supports(x: Tensor, *weights: Tensor) -> bool:
    """Whether the Triton kernels can run these operands: CUDA (or the CPU under TRITON_INTERPRET=1),
    fp32/bf16/fp16, the weights in the dtype of x."""
    if not has_triton():
        return False
    on_device = x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return (on_device and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and all(w.dtype == x.dtype for w in weights))


def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_grouped_kernels
    return triton_grouped_kernels


def tile_map(counts_E: Tensor, num_rows: int, block_m: int = BLOCK_M):
    """Row tiles that never span two experts, built on the device without a host sync.

    There are at most cdiv(R, block_m) + E tiles; the unused ones get expert -1 and are skipped.
    Returns expert_M (int32), first_row_M (int32), row_end_E (int32, exclusive end of each expert).
    """
    E = counts_E.numel()
    num_tiles = -(-num_rows // block_m) + E
    row_end_E = torch.cumsum(counts_E, 0)
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    tile_M = torch.arange(num_tiles, device=counts_E.device)
    expert_M = torch.searchsorted(tile_end_E, tile_M, right=True)
    valid_M = expert_M < E
    expert_M = expert_M.clamp(max=E - 1)
    first_row_M = (row_end_E - counts_E)[expert_M] + (tile_M - (tile_end_E - tiles_E)[expert_M]) * block_m
    expert_M = torch.where(valid_M, expert_M, -1)
    return expert_M.to(torch.int32), first_row_M.to(torch.int32), row_end_E.to(torch.int32)


def _num_programs(device: torch.device) -> int:
    """Persistent grid size: one program per multiprocessor."""
    if device.type == "cuda":
        return num_sms(device.index)
    return 4


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"   # tf32 is ignored for 16-bit operands


def _grouped_mm(a, w_EKN, c, tiles, *, n, epilogue, a_row=None, out_row=None, scale=None, gu=None,
                dscale=None) -> None:
    """c[out_row(r)] = epilogue(a[a_row(r)] @ w_EKN[e(r)]); w_EKN may be any strided view."""
    k = _kernels()
    expert_M, first_row_M, row_end_E = tiles
    assert a.shape[1] == w_EKN.shape[1] and a.dtype == w_EKN.dtype
    num_m_tiles = expert_M.numel()
    programs = _num_programs(a.device)
    gu_or_c = c if gu is None else gu

    def grid(meta):
        return (max(1, min(num_m_tiles * -(-n // meta["BLOCK_N"]), programs)),)

    k.grouped_mm_kernel[grid](
        a, a.stride(0), a.stride(1),
        w_EKN, w_EKN.stride(0), w_EKN.stride(1), w_EKN.stride(2),
        c, c.stride(0), c.stride(1),
        gu_or_c, gu_or_c.stride(0), gu_or_c.stride(1),
        expert_M, first_row_M, row_end_E,
        expert_M if a_row is None else a_row, expert_M if out_row is None else out_row,
        row_end_E if scale is None else scale, row_end_E if dscale is None else dscale,
        c.shape[0], n, a.shape[1], num_m_tiles,
        EPILOGUE=epilogue, GATHER_A=a_row is not None, SCATTER_OUT=out_row is not None,
        SCALE=scale is not None, DOT_PRECISION=_precision(a), BLOCK_M=BLOCK_M,
    )


def _wgrad(a, b, dw_EMN, counts_E, row_end_E, *, a_row=None, b_row=None, scale=None) -> None:
    """dw_EMN[e] = a[a_row(rows of e)]^T @ (scale * b[b_row(rows of e)])."""
    k = _kernels()
    E, M, N = dw_EMN.shape

    def grid(meta):
        return (-(-M // meta["BLOCK_M"]) * -(-N // meta["BLOCK_N"]), E)

    k.grouped_wgrad_kernel[grid](
        a, a.stride(0), a.stride(1),
        b, b.stride(0), b.stride(1),
        dw_EMN, dw_EMN.stride(0), dw_EMN.stride(1), dw_EMN.stride(2),
        row_end_E, counts_E, row_end_E if a_row is None else a_row,
        row_end_E if b_row is None else b_row, row_end_E if scale is None else scale,
        M, N,
        GATHER_A=a_row is not None, GATHER_B=b_row is not None, SCALE=scale is not None,
        DOT_PRECISION=_precision(a),
    )


def _row_metadata(weights_TK: Tensor, slot_of_row_R: Tensor):
    """Token and fp32 routing weight of every expert-contiguous row (device ops, no sync)."""
    token_of_row_R = slot_of_row_R // weights_TK.shape[1]
    w_R = weights_TK.reshape(-1)[slot_of_row_R].to(torch.float32).contiguous()
    return token_of_row_R, w_R


def _k_sum(y_SD: Tensor, T: int) -> Tensor:
    """y_TD[t] = sum_k y_SD[t*K + k], in y's dtype. Autocast stays on inside a custom op's body,
    and CUDA autocast runs `sum` in float32: the op would return fp32 where its fake says bf16
    (seen on the H200: the layer's output under autocast was fp32)."""
    with torch.autocast(y_SD.device.type, enabled=False):
        return y_SD.view(T, -1, y_SD.shape[-1]).sum(1)


@torch.library.custom_op("dropless::fused_experts", mutates_args=())
def _fused_experts_op(x_TD: Tensor, weights_TK: Tensor, slot_of_row_R: Tensor, counts_E: Tensor,
                      gate_up_EDF2: Tensor, down_EFD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns y_TD and, for backward, [g | u]_RF2 and h_RF."""
    T, D = x_TD.shape
    R, F = slot_of_row_R.numel(), down_EFD.shape[1]
    tiles = tile_map(counts_E, R)
    token_of_row_R, w_R = _row_metadata(weights_TK, slot_of_row_R)
    x_TD = x_TD.contiguous()
    gu_RF2 = x_TD.new_empty(R, 2 * F)
    h_RF = x_TD.new_empty(R, F)
    _grouped_mm(x_TD, gate_up_EDF2, h_RF, tiles, n=F, epilogue=_EPI_SWIGLU, a_row=token_of_row_R,
                gu=gu_RF2)
    y_SD = x_TD.new_empty(R, D)
    _grouped_mm(h_RF, down_EFD, y_SD, tiles, n=D, epilogue=_EPI_PLAIN, out_row=slot_of_row_R,
                scale=w_R)
    return _k_sum(y_SD, T), gu_RF2, h_RF


@_fused_experts_op.register_fake
def _(x_TD, weights_TK, slot_of_row_R, counts_E, gate_up_EDF2, down_EFD):
    R, F = slot_of_row_R.shape[0], down_EFD.shape[1]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(R, 2 * F), x_TD.new_empty(R, F)


@torch.library.custom_op("dropless::fused_experts_backward", mutates_args=())
def _fused_experts_backward_op(
        dy_TD: Tensor, x_TD: Tensor, weights_TK: Tensor, slot_of_row_R: Tensor, counts_E: Tensor,
        gate_up_EDF2: Tensor, down_EFD: Tensor, gu_RF2: Tensor, h_RF: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dx_TD, dweights_TK, dgate_up_EDF2, ddown_EFD."""
    T, D = x_TD.shape
    R, F = slot_of_row_R.numel(), down_EFD.shape[1]
    tiles = tile_map(counts_E, R)
    token_of_row_R, w_R = _row_metadata(weights_TK, slot_of_row_R)
    dy_TD, x_TD = dy_TD.contiguous(), x_TD.contiguous()
    # 1. d[g | u] from dy gathered per row through down^T; SwiGLU backward and d(w) in the epilogue
    dgu_RF2 = x_TD.new_empty(R, 2 * F)
    # one partial d(w) per column tile: sized for the narrowest tile the autotuner may choose
    dw_partial = torch.empty(-(-F // _kernels().MIN_BLOCK_N), R, device=x_TD.device,
                             dtype=torch.float32)
    _grouped_mm(dy_TD, down_EFD.transpose(1, 2), dgu_RF2, tiles, n=F, epilogue=_EPI_SWIGLU_BWD,
                a_row=token_of_row_R, scale=w_R, gu=gu_RF2, dscale=dw_partial)
    block_n = _kernels().grouped_mm_kernel.best_config.kwargs["BLOCK_N"]
    dw_R = dw_partial[: -(-F // block_n)].sum(0)    # only the rows the chosen config wrote
    dweights_S = torch.empty(R, device=x_TD.device, dtype=weights_TK.dtype)
    dweights_S[slot_of_row_R] = dw_R.to(weights_TK.dtype)   # a permutation: no duplicates
    # 2. dx: rows through gate_up^T, scattered to slot order, then the deterministic K-sum
    dx_SD = x_TD.new_empty(R, D)
    _grouped_mm(dgu_RF2, gate_up_EDF2.transpose(1, 2), dx_SD, tiles, n=D, epilogue=_EPI_PLAIN,
                out_row=slot_of_row_R)
    # 3. weight gradients, reduced over each expert's rows
    expert_M, first_row_M, row_end_E = tiles
    ddown_EFD = torch.empty_like(down_EFD)
    _wgrad(h_RF, dy_TD, ddown_EFD, counts_E, row_end_E, b_row=token_of_row_R, scale=w_R)
    dgate_up_EDF2 = torch.empty_like(gate_up_EDF2)
    _wgrad(x_TD, dgu_RF2, dgate_up_EDF2, counts_E, row_end_E, a_row=token_of_row_R)
    return _k_sum(dx_SD, T), dweights_S.view(weights_TK.shape), dgate_up_EDF2, ddown_EFD


@_fused_experts_backward_op.register_fake
def _(dy_TD, x_TD, weights_TK, slot_of_row_R, counts_E, gate_up_EDF2, down_EFD, gu_RF2, h_RF):
    return (x_TD.new_empty(x_TD.shape), weights_TK.new_empty(weights_TK.shape),
            gate_up_EDF2.new_empty(gate_up_EDF2.shape), down_EFD.new_empty(down_EFD.shape))


def _setup_context(ctx, inputs, output):
    x_TD, weights_TK, slot_of_row_R, counts_E, gate_up_EDF2, down_EFD = inputs
    _, gu_RF2, h_RF = output
    ctx.mark_non_differentiable(gu_RF2, h_RF)
    ctx.set_materialize_grads(False)   # no zero-filled grads for the saved intermediates
    ctx.save_for_backward(x_TD, weights_TK, slot_of_row_R, counts_E, gate_up_EDF2, down_EFD,
                          gu_RF2, h_RF)


def _backward(ctx, dy_TD, _dgu, _dh):
    dx, dweights, dgate_up, ddown = _fused_experts_backward_op(dy_TD, *ctx.saved_tensors)
    return dx, dweights, None, None, dgate_up, ddown


_fused_experts_op.register_autograd(_backward, setup_context=_setup_context)


def fused_experts(x_TD: Tensor, plan: Plan, weights_TK: Tensor, gate_up_EDF2: Tensor,
                  down_EFD: Tensor) -> Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_TD[t]): dispatch, experts and combine in one
    differentiable op. Dropless plans only (every slot has a row)."""
    assert plan.keep_S is None, "the fused path takes dropless plans only"
    y_TD, _, _ = _fused_experts_op(x_TD, weights_TK, plan.slot_of_row_R, plan.counts_E,
                                   gate_up_EDF2, down_EFD)
    return y_TD
