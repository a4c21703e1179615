"""Expert loads across data-parallel ranks: the global balance loss and the aux-free bias step.

Every rank reads distinct tokens (ep ranks too), so "global" means summed over the whole `dp` axis.

Balance loss: f (assignment fractions) is global, P (mean router probability) is this rank's.
The ranks' losses then average to exactly the single-process loss on the global batch (when the
ranks hold equal token counts), and so do their gradients under data-parallel gradient averaging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from dropless.dispatch import LocalDispatcher
from dropless.parallel.expert_parallel import AllToAllDispatcher, moe_modules


def dp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """All ranks of a mesh from `build_mesh` (its flattened `dp` axis)."""
    return mesh._flatten("dp").get_group()


def all_reduce_loads(loads: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum loads (e.g. ModelAux.tokens_per_expert [L, E]) over all data-parallel ranks; call it
    before `model.update_bias(...)` so every rank applies the same bias step."""
    out = loads.detach().clone()
    dist.all_reduce(out, group=dp_group(mesh))
    return out


class DataParallelDispatcher(LocalDispatcher):
    """LocalDispatcher (all experts here) whose balance-loss counts are summed over `group`: one
    small all-reduce of [E] counts per MoE layer per forward, no host sync."""

    def __init__(self, num_experts: int, capacity_factor: float | None, group: dist.ProcessGroup):
        super().__init__(num_experts, capacity_factor)
        self.counts_group = group

    global_counts = AllToAllDispatcher.global_counts   # the same sum over counts_group


def use_global_balance(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Make each router's balance loss count f over the global batch: swap each MoE's local
    dispatcher for a DataParallelDispatcher over all ranks (expert parallelism's dispatcher does
    the same by itself)."""
    group = dp_group(mesh)
    for moe in moe_modules(model):
        local = moe.dispatcher
        assert isinstance(local, LocalDispatcher), "use_global_balance goes before apply_ep"
        moe.dispatcher = DataParallelDispatcher(local.num_experts, local.capacity_factor, group)
    return model
