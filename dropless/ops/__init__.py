"""The functional seam: the one place that picks an implementation per backend and device.

Every op has a plain-PyTorch version in `reference.py`, which is the CPU path and the test oracle.
"""

from __future__ import annotations

import torch

from dropless.ops import grouped, reference, triton_blocksparse, triton_combine, triton_grouped
from dropless.ops.reference import Plan, expert_counts, make_plan, moe_loop

__all__ = ["Plan", "combine", "dispatch", "expert_counts", "make_plan", "moe_loop", "expert_swiglu",
           "fused_experts", "fuses_dispatch", "resolve_backend"]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> the fastest correct backend measured for this device and shape (BENCHMARKS.md).

    How it chooses: by the H200 bf16 forward+backward measurements (round 3, same run). "grouped"
    (three steps: dispatch, grouped_mm experts, combine) was fastest at every anchor shape, ratio
    to a dense SwiGLU of equal FLOPs Mixtral 0.94, OLMoE 0.85, Qwen3 0.76, against
    "grouped_lowmem" 0.80 / 0.74 / 0.66, "triton" 0.62 / 0.58 / 0.54 and "blocksparse"
    0.37 / 0.47 / 0.43; so "auto" picks "grouped" on every device and shape today. "grouped" falls
    back to the loop where grouped_mm cannot run (see grouped.supports); on CUDA its dispatch,
    combine and SwiGLU stages are Triton kernels whenever triton imports. "grouped_lowmem" trades
    ~10-15% of speed for activation memory (0.50 / 0.88 / 0.88 of dense, against 0.53 / 1.21 /
    1.26); it, "triton" and "blocksparse" are explicit opt-ins.
    """
    if backend != "auto":
        return backend
    return "grouped"


def fuses_dispatch(backend: str, x_TD: torch.Tensor, gate_up_EDF2, down_EFD) -> bool:
    """Whether this backend runs dispatch + experts + combine as one fused op (`fused_experts`)
    instead of the three steps. Falls back to the steps where its kernels cannot run."""
    resolved = resolve_backend(backend, x_TD)
    if resolved == "grouped_lowmem":
        # T == 0 takes the steps, which keep the graph connected to the routing weights
        return x_TD.shape[0] > 0 and grouped.supports(x_TD, gate_up_EDF2, down_EFD)
    return resolved in ("triton", "blocksparse") and triton_grouped.supports(x_TD, gate_up_EDF2,
                                                                              down_EFD)


def fused_experts(x_TD, plan: Plan, weights_TK, gate_up_EDF2, down_EFD,
                  backend: str = "triton") -> torch.Tensor:
    """y_TD = sum_k weights[t, k] * expert_{e(t, k)}(x_TD[t]), dispatch and combine included:
    "grouped_lowmem" keeps x_TD instead of the gathered rows and applies the weights before the
    down projection (grouped.fused_experts); "triton" gathers rows inside its kernels;
    "blocksparse" pads every expert to whole blocks."""
    resolved = resolve_backend(backend, x_TD)
    if resolved == "grouped_lowmem":
        return grouped.fused_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)
    if resolved == "blocksparse":
        return triton_blocksparse.blocksparse_experts(x_TD, plan, weights_TK, gate_up_EDF2, down_EFD)
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
    """y_RD = swiglu_e(x_RD) for every expert-contiguous group of rows. "triton",
    "blocksparse" and "grouped_lowmem" take the grouped path here: they fuse the dispatch, which
    this seam has already done (expert parallelism, capacity plans)."""
    if resolve_backend(backend, x_RD) == "reference":
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    return grouped.swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD)
