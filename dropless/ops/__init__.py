"""The functional seam: the one place that picks an implementation per backend and device.

Every op has a plain-PyTorch version in `reference.py`, which is the CPU path and the test oracle.
"""

from __future__ import annotations

import torch

from dropless.ops import grouped, reference, triton_grouped
from dropless.ops.reference import Plan, combine, dispatch, make_plan, moe_loop

__all__ = ["Plan", "combine", "dispatch", "make_plan", "moe_loop", "expert_swiglu", "fused_experts",
           "fuses_dispatch", "resolve_backend"]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> the fastest correct backend measured for this device (BENCHMARKS.md):
    - CUDA with triton installed: "triton", the fused grouped kernels (gather, experts and
      weighted combine in one op); it beat torch._grouped_mm at every anchor shape on the H200.
    - elsewhere: "grouped" matmuls (they fall back to the loop where grouped_mm cannot run).
    """
    if backend != "auto":
        return backend
    if x.is_cuda and triton_grouped.supports(x):
        return "triton"
    return "grouped"


def fuses_dispatch(backend: str, x_TD: torch.Tensor, gate_up_EDF2, down_EFD) -> bool:
    """Whether this backend runs dispatch + experts + combine as one fused op (`fused_experts`)
    instead of the three steps. Falls back to the steps where the Triton kernels cannot run."""
    return (resolve_backend(backend, x_TD) == "triton"
            and triton_grouped.supports(x_TD, gate_up_EDF2, down_EFD))


def fused_experts(x_TD, plan: Plan, weights_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_TD[t]) without a permuted copy of x."""
    return triton_grouped.fused_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)


def expert_swiglu(x_RD, counts_E, gate_up_EDF2, down_EFD, backend: str = "auto") -> torch.Tensor:
    """y_RD = swiglu_e(x_RD) for every expert-contiguous group of rows. "triton" takes the grouped
    path here: its kernels fuse the dispatch, which this seam has already done."""
    if resolve_backend(backend, x_RD) == "reference":
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    return grouped.swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD)
