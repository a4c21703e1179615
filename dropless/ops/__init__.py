"""The functional seam: the one place that picks an implementation per backend and device.

Every op has a plain-PyTorch version in `reference.py`, which is the CPU path and the test oracle.
"""

from __future__ import annotations

import warnings

import torch

from dropless.ops import grouped, reference, triton_blocksparse, triton_combine, triton_grouped
from dropless.ops.reference import Plan, expert_counts, make_plan, moe_loop, sort_key_dtype

__all__ = ["Plan", "combine", "dispatch", "expert_counts", "make_plan", "moe_loop", "expert_swiglu",
           "fused_experts", "fuses_dispatch", "resolve_backend", "compute_dtype",
           "cast_operands", "sort_key_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's low-precision dtype for x's device while
    autocast is on (the experts cast at the op, as autocast does for F.linear: fp32 master
    weights, bf16 products), else x's own dtype."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cast_operands(x, *weights):
    """x and the expert weights in `compute_dtype(x)` (no copies when they already are)."""
    dtype = compute_dtype(x)
    return (x.to(dtype), *(w.to(dtype) for w in weights))


_reported: set = set()


def _report_fallback(backend: str, reason: str, instead: str) -> None:
    """Warn once per (backend, reason, instead): no silent slow path."""
    key = (backend, reason, instead)
    if key in _reported or torch.compiler.is_compiling():
        return
    _reported.add(key)
    warnings.warn(f"MoE backend {backend!r} cannot run here ({reason}); running {instead!r} "
                  "instead", RuntimeWarning, stacklevel=4)


def resolve_backend(backend: str, x: torch.Tensor, gate_up_EDF2: torch.Tensor,
                    down_EFD: torch.Tensor) -> str:
    """The backend that runs on these operands (already in their compute dtype): the one place
    that chooses. 'auto' -> the fastest correct backend measured for the device and dtype; a
    backend that cannot run falls back, reported once (a RuntimeWarning naming it, the reason
    and what runs instead).

    How 'auto' chooses: bf16 on CUDA takes "grouped_lowmem" (grouped_mm experts keeping only
    [g | u] for backward: the rows are gathered from x again there, and the routing weight is
    applied to h, so the combine keeps nothing). In the layer it ran 0.94 / 0.81 / 0.70 of a
    dense SwiGLU of equal FLOPs at Mixtral / OLMoE / Qwen3 against "grouped"'s 0.92 / 0.82 /
    0.73 (H100, round 34), with activations 0.50 / 0.88 / 0.88 of dense against 0.53 / 1.21 /
    1.26; in `dropless train --preset medium` it ran at 0.99x / 1.01x grouped's tokens/s eager /
    compiled with 15% / 9% less peak memory. grouped_mm runs bf16 only on CUDA, so fp16/fp32 on
    CUDA take "triton" (far faster than the per-expert loop); CPU takes "grouped". "grouped",
    "triton" and "blocksparse" are explicit opt-ins.
    """
    wanted = backend
    if backend == "auto":
        wanted = "grouped"
        if x.is_cuda and triton_grouped.supports(x, gate_up_EDF2, down_EFD):
            runs = grouped.unsupported(x, gate_up_EDF2, down_EFD) is None
            wanted = "grouped_lowmem" if runs else "triton"
    if wanted == "reference":
        return wanted
    if wanted in ("triton", "blocksparse"):
        if triton_grouped.supports(x, gate_up_EDF2, down_EFD):
            return wanted
        _report_fallback(backend, f"its Triton kernels need CUDA, triton and fp32/bf16/fp16 "
                                  f"operands of one dtype; got {x.dtype} on {x.device.type}",
                         "grouped")
        wanted = "grouped"
    reason = grouped.unsupported(x, gate_up_EDF2, down_EFD)
    if reason is None:
        return wanted
    _report_fallback(backend, reason, "reference (a per-expert loop)")
    return "reference"


def fuses_dispatch(backend: str, x_TD: torch.Tensor, gate_up_EDF2, down_EFD) -> bool:
    """Whether this backend runs dispatch + experts + combine as one fused op (`fused_experts`)
    instead of the three steps (it falls back to the steps where its kernels cannot run). T == 0
    takes the steps, which keep the graph connected to the routing weights."""
    x_TD, gate_up_EDF2, down_EFD = cast_operands(x_TD, gate_up_EDF2, down_EFD)
    resolved = resolve_backend(backend, x_TD, gate_up_EDF2, down_EFD)
    return resolved in ("grouped_lowmem", "triton", "blocksparse") and x_TD.shape[0] > 0


def fused_experts(x_TD, plan: Plan, weights_TK, gate_up_EDF2, down_EFD,
                  backend: str = "triton") -> torch.Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_TD[t]), dispatch and combine included:
    "grouped_lowmem" keeps x_TD instead of the gathered rows and applies the weights before the
    down projection (grouped.fused_experts); "triton" gathers rows inside its kernels;
    "blocksparse" pads every expert to whole blocks."""
    x_TD, gate_up_EDF2, down_EFD = cast_operands(x_TD, gate_up_EDF2, down_EFD)
    resolved = resolve_backend(backend, x_TD, gate_up_EDF2, down_EFD)
    if resolved == "grouped_lowmem":
        return grouped.fused_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)
    if resolved == "blocksparse":
        return triton_blocksparse.blocksparse_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)
    assert resolved == "triton", resolved
    return triton_grouped.fused_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)


def dispatch(x_TD: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Token rows -> expert-contiguous rows x_RD (one per kept slot); backward gathers and K-sums."""
    if x_TD.is_cuda and x_TD.shape[0] > 0 and triton_grouped.supports(x_TD):
        return triton_combine.dispatch(x_TD, plan)
    return reference.dispatch(x_TD, plan)


def combine(y_RD: torch.Tensor, plan: Plan, weights_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_k weights[t, k] * y_rows[row(t, k)], deterministic (no atomics). On CUDA one Triton
    kernel each way (`triton_combine`: no slot-order copy, no batched matmul); else the reference."""
    if y_RD.is_cuda and y_RD.shape[0] > 0 and triton_grouped.supports(y_RD):
        return triton_combine.combine(y_RD, plan, weights_TK)
    return reference.combine(y_RD, plan, weights_TK)


def expert_swiglu(x_RD, counts_E, gate_up_EDF2, down_EFD, backend: str = "auto") -> torch.Tensor:
    """y_RD = swiglu_e(x_RD) for every expert-contiguous group of rows, in `compute_dtype(x_RD)`.
    "triton", "blocksparse" and "grouped_lowmem" take the grouped path here: they fuse the
    dispatch, which this seam has already done (expert parallelism, capacity plans)."""
    x_RD, gate_up_EDF2, down_EFD = cast_operands(x_RD, gate_up_EDF2, down_EFD)
    resolved = resolve_backend(backend, x_RD, gate_up_EDF2, down_EFD)
    if resolved != "reference" and (reason := grouped.unsupported(x_RD, gate_up_EDF2, down_EFD)):
        # a fused backend chosen for operands grouped_mm cannot take (fp32 on CUDA, say): these
        # unfused steps have only grouped_mm and the loop
        _report_fallback(backend, f"{reason}, on rows already dispatched", "reference")
        resolved = "reference"
    if resolved == "reference":
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    return grouped.swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD)
