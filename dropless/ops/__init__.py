"""The functional seam: the one place that picks an implementation per backend and device.

Every op has a plain-PyTorch version in `reference.py`, which is the CPU path and the test oracle.
"""

from __future__ import annotations

import torch

from dropless.ops import grouped, reference
from dropless.ops.reference import Plan, combine, dispatch, make_plan, moe_loop

__all__ = ["Plan", "combine", "dispatch", "make_plan", "moe_loop", "expert_swiglu", "resolve_backend"]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> the fastest correct backend measured for this device (BENCHMARKS.md):
    grouped matmuls on every device (they fall back to the loop where grouped_mm cannot run)."""
    if backend == "auto":
        return "grouped"
    return backend


def expert_swiglu(x_RD, counts_E, gate_up_EDF2, down_EFD, backend: str = "auto") -> torch.Tensor:
    """y_RD = swiglu_e(x_RD) for every expert-contiguous group of rows."""
    if resolve_backend(backend, x_RD) == "reference":
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    return grouped.swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD)
