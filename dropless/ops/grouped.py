"""Experts as grouped matmuls: each projection is ONE `torch._grouped_mm` over variable-size groups.

Legend: R routed rows (expert-contiguous), D model dim, F expert hidden, E experts.

The second half (SwiGLU and the down projection) has a hand-written backward (`_SwiGLUDown`) that
keeps only the pre-activations [g | u]_RF2 and recomputes silu(g) * u (one elementwise pass) instead
of keeping silu(g), u and their product (autograd's way: 2*R*F more). The first projection stays a
separate autograd node, so that [g | u] and dy are freed before dx is computed. Every product and
elementwise op is the one autograd would run, so results are bitwise those of plain autograd; on
CUDA the elementwise stage is instead two fused Triton passes (`triton_swiglu`: same formula and
rounding points, PyTorch's strided elementwise kernels took ~1.9 ms per fwd+bwd at the Qwen3 shape).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from dropless.ops import reference, triton_swiglu


def _fused_elementwise(t: torch.Tensor) -> bool:
    return t.is_cuda and importlib.util.find_spec("triton") is not None


def supports(x_RD: torch.Tensor, gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run these operands: CPU fp32/bf16/fp16, CUDA bf16 (sm90+),
    and every row stride a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    dtype, device = x_RD.dtype, x_RD.device
    if device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif device.type == "cuda":
        ok_dtype = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    else:
        ok_dtype = False
    if not ok_dtype or gate_up_EDF2.dtype != dtype or down_EFD.dtype != dtype:
        return False
    size = x_RD.element_size()
    return all(n * size % 16 == 0 for n in (x_RD.shape[-1], gate_up_EDF2.shape[-1],
                                             down_EFD.shape[-2], down_EFD.shape[-1]))


def _swiglu_act(gu_RF2: torch.Tensor):
    g_RF, u_RF = gu_RF2.chunk(2, dim=-1)
    silu_RF = F.silu(g_RF)
    return g_RF, u_RF, silu_RF, silu_RF * u_RF


class _SwiGLUDown(torch.autograd.Function):
    """y_RD = (silu(g) * u) @ down_e per expert-contiguous group, from [g | u]_RF2."""

    @staticmethod
    def forward(ctx, gu_RF2, offs_E, down_EFD):
        ctx.save_for_backward(gu_RF2, offs_E, down_EFD)
        h_RF = triton_swiglu.swiglu(gu_RF2) if _fused_elementwise(gu_RF2) else _swiglu_act(gu_RF2)[3]
        return torch._grouped_mm(h_RF, down_EFD, offs=offs_E)

    @staticmethod
    def backward(ctx, dy_RD):
        gu_RF2, offs_E, down_EFD = ctx.saved_tensors
        dy_RD = dy_RD.contiguous()   # grouped_mm's backward rejects expanded grads
        if _fused_elementwise(gu_RF2):
            # order for memory: h lives only for ddown, then dh and d[g | u] (one R*F less at peak)
            h_RF = triton_swiglu.swiglu(gu_RF2)
            ddown_EFD = torch._grouped_mm(h_RF.transpose(-2, -1), dy_RD, offs=offs_E)
            del h_RF
            dh_RF = torch._grouped_mm(dy_RD, down_EFD.transpose(-2, -1), offs=offs_E)
            return triton_swiglu.swiglu_backward(gu_RF2, dh_RF, want_h=False), None, ddown_EFD
        # 1. dh = dy @ down_e^T
        dh_RF = torch._grouped_mm(dy_RD, down_EFD.transpose(-2, -1), offs=offs_E)
        # 2. h recomputed (not saved); SwiGLU backward as autograd's mul and silu backward
        #    compute it, written in place into the two halves of d[g | u] (no concatenated copy)
        g_RF, u_RF, silu_RF, h_RF = _swiglu_act(gu_RF2)
        F_ = g_RF.shape[-1]
        dgu_RF2 = torch.empty_like(gu_RF2)
        torch.ops.aten.silu_backward.grad_input(dh_RF * u_RF, g_RF, grad_input=dgu_RF2[:, :F_])
        torch.mul(dh_RF, silu_RF, out=dgu_RF2[:, F_:])
        # 3. ddown_e = h_e^T @ dy_e
        ddown_EFD = torch._grouped_mm(h_RF.transpose(-2, -1), dy_RD, offs=offs_E)
        return dgu_RF2, None, ddown_EFD


def swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """Same function as reference.swiglu_loop; falls back to it where grouped_mm cannot run."""
    if not supports(x_RD, gate_up_EDF2, down_EFD):
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)   # no sync: offsets stay on device
    gu_RF2 = torch._grouped_mm(x_RD, gate_up_EDF2, offs=offs_E)   # autograd keeps x_RD alone
    return _SwiGLUDown.apply(gu_RF2, offs_E, down_EFD)
