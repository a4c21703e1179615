"""Experts as grouped matmuls: each projection is ONE `torch._grouped_mm` over variable-size groups.

Legend: R routed rows (expert-contiguous), D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropless.ops import reference


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


def swiglu_grouped(x_RD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """Same function as reference.swiglu_loop; falls back to it where grouped_mm cannot run."""
    if not supports(x_RD, gate_up_EDF2, down_EFD):
        return reference.swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)   # no sync: offsets stay on device
    h_RF2 = torch._grouped_mm(x_RD, gate_up_EDF2, offs=offs_E)
    g_RF, u_RF = h_RF2.chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g_RF) * u_RF, down_EFD, offs=offs_E)
