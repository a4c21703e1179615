"""Expert parallelism: experts split over the mesh's `ep` axis, rows moved by two all-to-alls.

Legend: T tokens, D model dim, E experts (global), e local experts (E / P), K top-k, P ep ranks,
R rows this rank sends (T*K), N rows this rank receives.

Applied from outside: `apply_ep(model, mesh)` turns each MoE's expert weights into DTensors sharded
on the expert dim and swaps its dispatcher; `MoE.forward` is unchanged. The dispatcher's plan carries
`counts_E` of the LOCAL experts ([e]), which is what the experts module is handed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from dropless import ops
from dropless.experts import Experts
from dropless.moe import MoE


@dataclass
class EPPlan:
    local: ops.Plan          # this rank's slots -> R rows sorted by global expert (= by owner rank)
    regroup: ops.Plan        # N received rows (source-rank-major) -> rows sorted by local expert
    send_splits: list[int]   # rows to each ep rank
    recv_splits: list[int]   # rows from each ep rank
    counts_E: torch.Tensor   # int64 [e]: received rows per LOCAL expert (what Experts is given)
    dropped: int = 0


class AllToAllDispatcher:
    """Dropless dispatch across ep ranks; expert i lives on ep rank i // e. Every rank must call
    dispatch and combine the same number of times (they are collectives), and backward runs the
    two all-to-alls in reverse on every rank."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup):
        self.num_experts = num_experts
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        assert num_experts % self.num_ranks == 0
        self.num_local = num_experts // self.num_ranks

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor):
        P, e = self.num_ranks, self.num_local
        # 1. local permute: rows sorted by global expert are already grouped by owning rank
        local = ops.make_plan(expert_ids_TK, self.num_experts)
        x_RD = ops.dispatch(x_TD, local)
        # 2. exchange counts: recv_Pe[p, j] = rows rank p sends to my local expert j
        recv_Pe = torch.empty_like(local.counts_E)
        dist.all_to_all_single(recv_Pe, local.counts_E, group=self.group)
        recv_Pe = recv_Pe.view(P, e)
        send_splits = local.counts_E.view(P, e).sum(1).tolist()  # sync: split sizes for all_to_all
        recv_splits = recv_Pe.sum(1).tolist()                    # sync: split sizes for all_to_all
        # 3. each row to the rank owning its expert (uneven splits, gradients flow back)
        x_ND = all_to_all_single_autograd(x_RD, recv_splits, send_splits, self.group)
        # 4. received rows are source-major; regroup by local expert with a top-1 plan (stable sort,
        #    so source order is kept inside each expert)
        local_expert_N = torch.arange(e, device=x_TD.device).repeat(P).repeat_interleave(
            recv_Pe.reshape(-1), output_size=sum(recv_splits))   # size known: no second sync
        regroup = ops.make_plan(local_expert_N.unsqueeze(1), e)
        x_ND = ops.dispatch(x_ND, regroup)
        return x_ND, EPPlan(local, regroup, send_splits, recv_splits, regroup.counts_E)

    def combine(self, y_ND: torch.Tensor, plan: EPPlan, weights_TK: torch.Tensor) -> torch.Tensor:
        # 5. back to source-rank-major order (a permutation: one source row per output row)
        y_ND = y_ND[plan.regroup.row_of_slot_S]
        # 6. outputs home, splits mirrored
        y_RD = all_to_all_single_autograd(y_ND, plan.send_splits, plan.recv_splits, self.group)
        # 7. weighted sum over k, exactly as in one process
        y_TD = ops.combine(y_RD, plan.local, weights_TK)
        if y_RD.shape[0] == 0:
            # no tokens here: keep the all-to-all in the graph so its backward (a collective that
            # the other ranks wait on) still runs on this rank
            y_TD = y_TD + y_RD.sum() * 0
        return y_TD

    def tokens_per_expert(self, plan: EPPlan) -> torch.Tensor:
        """[E]: assignments of this rank's tokens to every (global) expert."""
        return plan.local.counts_E


def local_tensor(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class LocalExperts(Experts):
    """Experts whose weights are DTensors Shard(0) over `ep`: the grouped matmul runs on this rank's
    e experts with the local counts from AllToAllDispatcher. Gradients come back as DTensors.
    `grad_scale` multiplies the weight gradients only (data parallelism sets it; see fsdp.py)."""

    grad_scale: float = 1.0

    def forward(self, x_ND: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        gate_up, down = local_tensor(self.gate_up), local_tensor(self.down)
        if self.grad_scale != 1.0:
            gate_up = _ScaleGrad.apply(gate_up, self.grad_scale)
            down = _ScaleGrad.apply(down, self.grad_scale)
        return ops.expert_swiglu(x_ND, counts_e, gate_up, down, self.backend)


def moe_modules(model: nn.Module) -> list[MoE]:
    return [model] if isinstance(model, MoE) else [m for m in model.modules() if isinstance(m, MoE)]


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE's experts over mesh["ep"] (rank r keeps experts [r*e, (r+1)*e)) and swap in
    the all-to-all dispatcher. Call before FSDP; weights are taken from ep rank 0 (scatter)."""
    ep_mesh = mesh["ep"]
    P = ep_mesh.size()
    for moe in moe_modules(model):
        if moe.cfg.capacity_factor is not None:
            raise ValueError(f"capacity_factor={moe.cfg.capacity_factor} is invalid with ep={P}: "
                             "expert parallelism is dropless only (capacity_factor=None)")
        if moe.cfg.num_experts % P:
            raise ValueError(f"ep={P} is invalid: must divide num_experts={moe.cfg.num_experts}")
        experts = moe.experts
        for name in ("gate_up", "down"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]),
                                                requires_grad=full.requires_grad))
        experts.__class__ = LocalExperts
        moe.dispatcher = AllToAllDispatcher(moe.cfg.num_experts, ep_mesh.get_group())
    return model
