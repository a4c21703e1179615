"""The dispatcher seam: how a layer's routed rows reach their experts and come back.

Legend: T tokens, D model dim, E experts, K top-k, R rows handed to the experts.

`MoE` holds one object that implements `Dispatcher`; `LocalDispatcher` (one process) is the default.
Parallelism replaces it from outside (`dropless.parallel`): a data-parallel one that counts expert
loads over all ranks, and the expert-parallel one that moves rows between ranks by all-to-all. The
model files never import torch.distributed; everything distributed lives behind this protocol.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from dropless import ops


class Dispatcher(Protocol):
    """What `MoE.forward` calls, in this order, on every forward:

    1. `global_counts(counts_E)` (from the router): this call's assignments per expert -> the
       counts of the whole batch that the balance loss's f is taken over. A collective under data
       parallelism, so it is called on every rank, with or without tokens.
    2. `dispatch(x_TD, expert_ids_TK, weights_TK)` -> `(x_RD, plan)`: rows in expert-contiguous
       order for the experts this process holds; `plan.counts_E` [experts held here] sizes their
       groups and `plan.dropped` counts assignments dropped by capacity.
    3. `combine(y_RD, plan, weights_TK)` -> `y_TD = sum_k weights[t, k] * expert output of (t, k)`.
       A dispatcher applies the routing weights where it sums: the local one here, the
       all-to-all one on the experts' rank (the weights travel with the rows in step 2).
    4. `tokens_per_expert(plan)` -> int64 [E]: this call's assignments per (global) expert.

    `fusable` says whether a fused expert backend may gather and combine by itself from
    `plan(expert_ids_TK)` (an `ops.Plan` over this process's tokens) instead of steps 2-3; only a
    dispatcher whose experts are all local and that drops nothing can allow it.
    """

    fusable: bool

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor: ...

    def plan(self, expert_ids_TK: torch.Tensor) -> ops.Plan: ...

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 weights_TK: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def combine(self, y_RD: torch.Tensor, plan: Any, weights_TK: torch.Tensor) -> torch.Tensor: ...

    def tokens_per_expert(self, plan: Any) -> torch.Tensor: ...


class LocalDispatcher:
    """Single-process dispatch: permute slots into expert-contiguous rows and back; the counts are
    this process's own."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int, top_k: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * top_k / self.num_experts)

    @property
    def fusable(self) -> bool:
        return self.capacity_factor is None

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        return counts_E

    def plan(self, expert_ids_TK: torch.Tensor) -> ops.Plan:
        return ops.make_plan(expert_ids_TK, self.num_experts, self.capacity(*expert_ids_TK.shape))

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        plan = self.plan(expert_ids_TK)
        return ops.dispatch(x_TD, plan), plan

    def combine(self, y_RD: torch.Tensor, plan: ops.Plan, weights_TK: torch.Tensor):
        return ops.combine(y_RD, plan, weights_TK)

    def tokens_per_expert(self, plan: ops.Plan) -> torch.Tensor:
        return plan.counts_E
