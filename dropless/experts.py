"""Routed expert weights and their forward over expert-contiguous rows; the dense SwiGLU.

Legend: R routed rows, D model dim, F expert hidden, E experts (local experts under EP).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless import ops


class Experts(nn.Module):
    """E SwiGLU experts stored fused: gate_up [E, D, 2F] (gate = first half), down [E, F, D]."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.gate_up, std=self.gate_up.shape[1] ** -0.5)
        nn.init.normal_(self.down, std=self.down.shape[1] ** -0.5)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return ops.expert_swiglu(x_RD, counts_E, self.gate_up, self.down, self.backend)

    def decodes(self, x_TD: torch.Tensor, top_k: int) -> bool:
        """Whether `decode` (few tokens straight from the routing) serves this call: only
        quantized experts have one (dropless.quant.QuantizedExperts)."""
        return False

    def fuses_dispatch(self, x_TD: torch.Tensor) -> bool:
        return ops.fuses_dispatch(self.backend, x_TD, self.gate_up, self.down)

    def fused(self, x_TD: torch.Tensor, plan: ops.Plan, weights_TK: torch.Tensor) -> torch.Tensor:
        """Dispatch + experts + weighted combine in one op, from token-order rows."""
        return ops.fused_experts(x_TD, plan, weights_TK, self.gate_up, self.down, self.backend)


class SwiGLU(nn.Module):
    """Dense feed-forward: down(silu(gate(x)) * up(x)). Shared experts and dense layers."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        # like an expert (std fan_in^-0.5), not nn.Linear's default (std (3 fan_in)^-0.5): a shared
        # expert would otherwise start with ~1/5 of a routed expert's output scale
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
