"""The MoE layer: router -> dispatcher -> experts -> combine (+ shared experts).

Legend: T tokens, D model dim, E experts, K top-k, R routed rows.
Dropless by default: every token reaches each of its top-k experts. NaN/Inf in the input are not
masked: they propagate to the tokens (and, through routing, the losses) they touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dropless import ops
from dropless.config import MoEConfig
from dropless.dispatch import Dispatcher, LocalDispatcher
from dropless.experts import Experts, SwiGLU
from dropless.router import Router


@dataclass
class MoEAux:
    balance_loss: torch.Tensor       # scalar, coefficient applied, in the graph
    z_loss: torch.Tensor             # scalar, coefficient applied, in the graph
    tokens_per_expert: torch.Tensor  # int64 [E]: kept assignments per expert in this call
    dropped: int                     # assignments dropped by capacity (0 when dropless)


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.dim, cfg.hidden_dim, cfg.backend)
        self.shared = SwiGLU(cfg.dim, cfg.shared_hidden) if cfg.num_shared_experts else None
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_gate else None
        # the seam parallelism swaps from outside (dropless.dispatch.Dispatcher)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts, cfg.capacity_factor)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0:
            raise ValueError("x has 0 dims: MoE expects a tensor of shape [..., dim]")
        if x.shape[-1] != self.cfg.dim:
            raise ValueError(f"x.shape[-1]={x.shape[-1]} is invalid: must equal dim={self.cfg.dim}")
        if not x.is_floating_point():
            raise ValueError(f"x.dtype={x.dtype} is invalid: must be a floating-point dtype")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        self._check_input(x)
        x_TD = x.reshape(-1, self.cfg.dim)
        route = self.router(x_TD, self.dispatcher.global_counts)   # fp32 logits from x as it comes
        # under autocast the experts compute in its dtype: cast once here, so that dispatch moves
        # (and, under expert parallelism, the all-to-all sends) bf16 rows, not fp32
        x_TD = x_TD.to(ops.compute_dtype(x_TD))
        plan = None
        if self.dispatcher.fusable and self.experts.decodes(x_TD, self.cfg.top_k):
            # a few tokens through int4 experts (dropless/quant): straight from the routing, no sort
            y_TD = self.experts.decode(x_TD, route.expert_ids_TK, route.weights_TK)
        elif self.dispatcher.fusable and self.experts.fuses_dispatch(x_TD):
            # one op gathers token rows, runs the experts and combines ("grouped_lowmem",
            # "triton", "blocksparse"): no gathered rows kept for backward
            plan = self.dispatcher.plan(route.expert_ids_TK)
            y_TD = self.experts.fused(x_TD, plan, route.weights_TK)
        else:
            x_RD, plan = self.dispatcher.dispatch(x_TD, route.expert_ids_TK, route.weights_TK)
            y_RD = self.experts(x_RD, plan.counts_E)
            y_TD = self.dispatcher.combine(y_RD, plan, route.weights_TK)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD
        if plan is None:
            counts_E, dropped = ops.expert_counts(route.expert_ids_TK, self.cfg.num_experts), 0
        else:
            counts_E, dropped = self.dispatcher.tokens_per_expert(plan), plan.dropped
        return y_TD.view(x.shape), MoEAux(route.balance_loss, route.z_loss, counts_E, dropped)

    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free bias step; call once per optimizer step with that step's loads."""
        self.router.update_bias(load_E)
