"""Experts as grouped matmuls: each projection is ONE `torch._grouped_mm` over variable-size groups.

Legend: R routed rows (expert-contiguous), D model dim, F expert hidden, E experts.

The second half (SwiGLU and the down projection) has a hand-written backward (`_SwiGLUDown`) that
keeps only the pre-activations [g | u]_RF2 and recomputes silu(g) * u (one elementwise pass) instead
of keeping silu(g), u and their product (autograd's way: 2*R*F more). The first projection stays a
separate autograd node, so that [g | u] and dy are freed before dx is computed. Every product and
elementwise op is the one autograd would run, so results are bitwise those of plain autograd; on
CUDA the elementwise stage is instead two fused Triton passes (`triton_swiglu`: same formula and
rounding points, PyTorch's strided elementwise kernels took ~1.9 ms per fwd+bwd at the Qwen3 shape).

`fused_experts` is the layer's dropless single-process path: it gathers token rows inside the
first projection's node (keeps x_TD, not x_RD) and applies the routing weights to h before the
down projection, so the combine is a K-sum that keeps nothing. Backward keeps 2*R*F instead of
2*R*F + 2*R*D; it costs one re-gather of x_RD and three R*F elementwise passes more (the weight
applied to h and dh, and dw = <dh', h>), done by PyTorch beside the unchanged Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropless.ops import reference, triton_combine, triton_swiglu
from dropless.ops.device import cuda_capability_major, has_triton




def _fused_elementwise(t: torch.Tensor) -> bool:
    """Whether the elementwise stages and the K-sum run as Triton kernels."""
    return t.is_cuda and has_triton()


@torch.library.custom_op("dropless::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:   # [R, K] x [E, K, N] -> [R, N]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])   # [K, R] x [R, N] -> [E, K, N]


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    return (_grouped_mm_op(grad, b.transpose(-2, -1), offs),
            _grouped_mm_op(a.transpose(-2, -1), grad, offs), None)


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm; under torch.compile through an opaque custom op, because the compiler's
    meta function of _grouped_mm accepts bf16 only (fp32 and fp16 run fine eagerly on CPU)."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def unsupported(x_RD: torch.Tensor, gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor) -> str | None:
    """Why torch._grouped_mm cannot run these operands, or None when it can: it needs CPU
    fp32/bf16/fp16 or CUDA bf16 on sm90+, one dtype, and every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    dtype, device = x_RD.dtype, x_RD.device
    if device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"grouped_mm on CPU takes fp32/bf16/fp16, got {dtype}"
    elif device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"grouped_mm on CUDA takes bf16, got {dtype}"
        if cuda_capability_major(device.index) < 9:
            return "grouped_mm on CUDA needs compute capability 9.0 or newer"
    else:
        return f"grouped_mm does not run on {device.type}"
    if gate_up_EDF2.dtype != dtype or down_EFD.dtype != dtype:
        return (f"the expert weights ({gate_up_EDF2.dtype}, {down_EFD.dtype}) are not in the "
                f"inputs' dtype {dtype}")
    size = x_RD.element_size()
    if not all(n * size % 16 == 0 for n in (x_RD.shape[-1], gate_up_EDF2.shape[-1],
                                             down_EFD.shape[-2], down_EFD.shape[-1])):
        return "grouped_mm needs row strides that are multiples of 16 bytes"
    return None


def supports(x_RD: torch.Tensor, gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor) -> bool:
    return unsupported(x_RD, gate_up_EDF2, down_EFD) is None


def _swiglu_act(gu_RF2: torch.Tensor):
    g_RF, u_RF = gu_RF2.chunk(2, dim=-1)
    silu_RF = F.silu(g_RF)
    return g_RF, u_RF, silu_RF, silu_RF * u_RF


class _SwiGLUDown(torch.autograd.Function):
    """y_RD = (silu(g) * u) @ down_e per expert-contiguous group, from [g | u]_RF2.

    With routing weights w_R (one per row, in the rows' dtype): y_RD = (w * silu(g) * u) @ down_e,
    so the combine becomes a plain K-sum that keeps nothing for backward, and dw is
    sum_f dh'[f] * h[f] with dh' = dy @ down_e^T and h = silu(g) * u, both computed here anyway.
    """

    @staticmethod
    def forward(ctx, gu_RF2, offs_E, down_EFD, w_R=None):
        ctx.save_for_backward(gu_RF2, offs_E, down_EFD, w_R)
        if _fused_elementwise(gu_RF2):   # the weight applied inside the SwiGLU pass
            return _gmm(triton_swiglu.swiglu(gu_RF2, w_R), down_EFD, offs=offs_E)
        h_RF = _swiglu_act(gu_RF2)[3]
        if w_R is not None:
            h_RF.mul_(w_R.unsqueeze(-1))   # h is ours: no second R*F buffer
        return _gmm(h_RF, down_EFD, offs=offs_E)

    @staticmethod
    def backward(ctx, dy_RD):
        gu_RF2, offs_E, down_EFD, w_R = ctx.saved_tensors
        if w_R is not None:
            return _weighted_backward(gu_RF2, offs_E, down_EFD, w_R, dy_RD.contiguous())
        dy_RD = dy_RD.contiguous()   # grouped_mm's backward rejects expanded grads
        if _fused_elementwise(gu_RF2):
            # order for memory: h lives only for ddown, then dh and d[g | u] (one R*F less at peak)
            h_RF = triton_swiglu.swiglu(gu_RF2)
            ddown_EFD = _gmm(h_RF.transpose(-2, -1), dy_RD, offs=offs_E)
            del h_RF
            dh_RF = _gmm(dy_RD, down_EFD.transpose(-2, -1), offs=offs_E)
            return triton_swiglu.swiglu_backward(gu_RF2, dh_RF, want_h=False), None, ddown_EFD, None
        # 1. dh = dy @ down_e^T
        dh_RF = _gmm(dy_RD, down_EFD.transpose(-2, -1), offs=offs_E)
        # 2. h recomputed (not saved); SwiGLU backward as autograd's mul and silu backward
        #    compute it, written in place into the two halves of d[g | u] (no concatenated copy)
        g_RF, u_RF, silu_RF, h_RF = _swiglu_act(gu_RF2)
        dgu_RF2 = _swiglu_backward_cpu(gu_RF2, g_RF, u_RF, silu_RF, dh_RF)
        # 3. ddown_e = h_e^T @ dy_e
        ddown_EFD = _gmm(h_RF.transpose(-2, -1), dy_RD, offs=offs_E)
        return dgu_RF2, None, ddown_EFD, None


def _swiglu_backward_cpu(gu_RF2, g_RF, u_RF, silu_RF, dh_RF):
    """d[g | u] as autograd's mul and silu backward compute it, in place into the two halves."""
    if torch.compiler.is_compiling():   # out= into views does not trace; the compiler fuses this
        return torch.cat([torch.ops.aten.silu_backward(dh_RF * u_RF, g_RF), dh_RF * silu_RF], -1)
    F_ = g_RF.shape[-1]
    dgu_RF2 = torch.empty_like(gu_RF2)
    torch.ops.aten.silu_backward.grad_input(dh_RF * u_RF, g_RF, grad_input=dgu_RF2[:, :F_])
    torch.mul(dh_RF, silu_RF, out=dgu_RF2[:, F_:])
    return dgu_RF2


def _weighted_backward(gu_RF2, offs_E, down_EFD, w_R, dy_RD):
    """Backward of y = (w * h) @ down_e, in autograd's steps: dh' = dy @ down_e^T, dw = <dh', h>
    (fp32 sum of the rounded products), ddown_e = (w * h)_e^T @ dy_e, dh = w * dh'. Peak: [g | u],
    dy and three R*F buffers (dh', h and the products for dw), as [g | u], dy, dh and d[g | u]
    later and in the unweighted backward."""
    dhw_RF = _gmm(dy_RD, down_EFD.transpose(-2, -1), offs=offs_E)
    if _fused_elementwise(gu_RF2):
        # one Triton pass: dw, d[g | u] from dh = w * dh', and w * h written over dh' (6 R*F
        # of traffic where a pass for w * h, dw, dh and one for d[g | u] took 10)
        hw_RF, dw_R, dgu_RF2 = triton_swiglu.swiglu_weighted_backward(gu_RF2, dhw_RF, w_R,
                                                                      want_dgu=True)
        ddown_EFD = _gmm(hw_RF.transpose(-2, -1), dy_RD, offs=offs_E)
        return dgu_RF2, None, ddown_EFD, dw_R
    g_RF, u_RF, silu_RF, h_RF = _swiglu_act(gu_RF2)
    dw_R = (dhw_RF * h_RF).sum(-1, dtype=torch.float32).to(w_R.dtype)
    w_R1 = w_R.unsqueeze(-1)
    ddown_EFD = _gmm(h_RF.mul_(w_R1).transpose(-2, -1), dy_RD, offs=offs_E)
    del h_RF
    dh_RF = dhw_RF.mul_(w_R1)
    dgu_RF2 = _swiglu_backward_cpu(gu_RF2, g_RF, u_RF, silu_RF, dh_RF)
    return dgu_RF2, None, ddown_EFD, dw_R


def swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """Same function as reference.swiglu_loop, for operands `supports` accepts (the seam in
    ops/__init__.py chooses, and reports any fallback)."""
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)   # no sync: offsets stay on device
    gu_RF2 = _gmm(x_RD, gate_up_EDF2, offs=offs_E)   # autograd keeps x_RD alone
    return _SwiGLUDown.apply(gu_RF2, offs_E, down_EFD)


class _GatherUp(torch.autograd.Function):
    """gu_RF2 = x_TD[token(r)] @ gate_up_e: dispatch and the first projection as one node that keeps
    x_TD (alive anyway) and the row index instead of the gathered rows x_RD (R*D, K times x_TD):
    backward gathers them again. dx_TD[t] = sum_k dx_RD[row(t, k)], one fp32 K-sum as in dispatch."""

    @staticmethod
    def forward(ctx, x_TD, token_of_row_R, row_of_slot_S, top_k, offs_E, gate_up_EDF2):
        ctx.save_for_backward(x_TD, token_of_row_R, row_of_slot_S, offs_E, gate_up_EDF2)
        ctx.top_k = top_k
        return _gmm(x_TD[token_of_row_R], gate_up_EDF2, offs=offs_E)

    @staticmethod
    def backward(ctx, dgu_RF2):
        x_TD, token_of_row_R, row_of_slot_S, offs_E, gate_up_EDF2 = ctx.saved_tensors
        dgu_RF2 = dgu_RF2.contiguous()
        x_RD = x_TD[token_of_row_R]
        dgate_up = _gmm(x_RD.transpose(-2, -1), dgu_RF2, offs=offs_E)
        del x_RD
        dx_RD = _gmm(dgu_RF2, gate_up_EDF2.transpose(-2, -1), offs=offs_E)
        del dgu_RF2
        return _sum_rows(dx_RD, row_of_slot_S, ctx.top_k), None, None, None, None, dgate_up


def _sum_rows(y_RD: torch.Tensor, row_of_slot_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """y_TD[t] = sum_k y_RD[row(t, k)]: one fp32 K-sum rounded once, no atomics (on CUDA the
    combine kernel with unit weights; else dispatch's backward in `reference`)."""
    T, D = row_of_slot_S.numel() // top_k, y_RD.shape[-1]
    if _fused_elementwise(y_RD):
        ones_TK = y_RD.new_ones(T, top_k)
        return triton_combine._launch_combine(y_RD, ones_TK, row_of_slot_S, None)
    return y_RD[row_of_slot_S].view(T, top_k, D).sum(1)


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum_k y_RD[row(t, k)] (weights already applied to the rows); backward is a gather,
    so nothing but the row index is kept (the weighted combine keeps y_RD, R*D)."""

    @staticmethod
    def forward(ctx, y_RD, row_of_slot_S, token_of_row_R, top_k):
        ctx.save_for_backward(token_of_row_R)
        return _sum_rows(y_RD, row_of_slot_S, top_k)

    @staticmethod
    def backward(ctx, dy_TD):
        (token_of_row_R,) = ctx.saved_tensors
        return dy_TD[token_of_row_R], None, None, None


def fused_experts(x_TD, plan: reference.Plan, weights_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """Same function as dispatch -> swiglu_grouped -> combine for a dropless plan, keeping only
    [g | u]_RF2 (2*R*F) and indices for backward instead of x_RD, [g | u]_RF2 and y_RD:
    1. gather + first projection (`_GatherUp`: keeps x_TD, not x_RD);
    2. SwiGLU, routing weight and down projection (`_SwiGLUDown` with w_R: the weight is applied to
       h, rounded to the rows' dtype first as `combine` rounds it);
    3. an unweighted K-sum (`_Combine`: keeps no rows)."""
    assert plan.keep_S is None, "fused_experts takes dropless plans only"
    token_of_row_R = plan.slot_of_row_R // plan.top_k
    w_R = weights_TK.to(x_TD.dtype).reshape(-1)[plan.slot_of_row_R]
    offs_E = torch.cumsum(plan.counts_E, 0).to(torch.int32)   # no sync: offsets stay on device
    gu_RF2 = _GatherUp.apply(x_TD, token_of_row_R, plan.row_of_slot_S, plan.top_k, offs_E,
                             gate_up_EDF2)
    y_RD = _SwiGLUDown.apply(gu_RF2, offs_E, down_EFD, w_R)
    return _Combine.apply(y_RD, plan.row_of_slot_S, token_of_row_R, plan.top_k)
