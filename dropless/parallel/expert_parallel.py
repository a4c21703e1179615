"""Expert parallelism: experts split over the mesh's `ep` axis, token rows moved by two all-to-alls.

Legend: T tokens, D model dim, E experts (global), e local experts (E / P), K top-k, P ep ranks,
S token rows this rank sends (one per token and destination rank), N token rows it receives,
R expert rows it computes (one per received token and local expert chosen).

Applied from outside: `apply_ep(model, mesh)` swaps each MoE's `experts` for an `ExpertShard` (this
rank's experts as DTensors) and its dispatcher for an `AllToAllDispatcher`, behind the interfaces
`MoE.forward` already calls (dropless.dispatch.Dispatcher).

The exchange sends each token once to every rank that owns at least one of its experts (not once
per expert): with top-8 routing over 2 ranks that is ~2 rows per token instead of 8, and the
partial sums come back the same way, already weighted. Per forward:
  1. the plan: destination ranks of every token; per-rank row and per-expert slot counts exchanged
     by one small all-to-all, and read back in the one host sync (split sizes);
  2. send buffer in rank-major order by one gather; the routing weights and expert ids of each
     sent row (K each) travel in a small all-to-all ahead of the rows, so the receiver sorts them
     while the rows are in flight;
  3. received rows -> one row per local expert chosen, grouped by expert: one gather;
  4. experts; then a weighted partial sum per received token (the combine kernel over its local
     slots), back by the mirrored all-to-all, and a sum over the <= P partials per token at home.
Steps 2-4 are differentiable (the backward runs the same all-to-alls in reverse); no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from dropless import ops
from dropless.experts import Experts
from dropless.moe import MoE


@dataclass
class EPPlan:
    home: ops.Plan           # this rank's (token, destination rank) slots -> S rows, rank-major
    local: ops.Plan          # received (row, k) slots on this rank -> R rows, grouped by local expert
    weights_NK: torch.Tensor  # routing weights of the received rows (in the graph)
    send_splits: list[int]   # rows to each ep rank
    recv_splits: list[int]   # rows from each ep rank
    tokens_E: torch.Tensor   # int64 [E]: this rank's assignments per global expert
    dropped: int = 0

    @property
    def counts_E(self) -> torch.Tensor:
        """int64 [e]: rows per LOCAL expert, what the experts are handed."""
        return self.local.counts_E


def slot_plan(group_TK: torch.Tensor, keep_TK: torch.Tensor, num_groups: int) -> ops.Plan:
    """An ops.Plan over the kept slots of [T, K], sorted by group (stable: token order inside each
    group); unkept slots are "dropped" (dispatch and combine mask them). Its `slot_of_row_R` lists
    every slot, the kept ones first: `kept_rows` cuts it once their number is known on the host,
    so the sort can run before the sync."""
    T, K = group_TK.shape
    keep_S = keep_TK.reshape(-1)
    key_S = torch.where(keep_TK, group_TK, num_groups).reshape(-1)
    order_S = torch.argsort(key_S.to(ops.sort_key_dtype(num_groups + 1)), stable=True)
    counts = ops.expert_counts(key_S, num_groups + 1)[:num_groups]
    row_of_slot = torch.empty_like(order_S).scatter_(
        0, order_S, torch.arange(T * K, device=key_S.device)).masked_fill_(~keep_S, 0)
    return ops.Plan(order_S, row_of_slot, keep_S, counts, K)


def kept_rows(plan: ops.Plan, num_rows: int) -> ops.Plan:
    return replace(plan, slot_of_row_R=plan.slot_of_row_R[:num_rows])


class AllToAllDispatcher:
    """Dropless dispatch across ep ranks (dropless.dispatch.Dispatcher); expert i lives on ep rank
    i // e. Every rank must call dispatch and combine the same number of times (collectives), and
    backward runs the all-to-alls in reverse on every rank. `counts_group` sums the balance loss's
    expert counts (all data-parallel ranks: every rank reads distinct tokens)."""

    fusable = False   # rows cross ranks: fused backends cannot gather them

    def __init__(self, num_experts: int, group: dist.ProcessGroup,
                 counts_group: dist.ProcessGroup | None = None):
        self.num_experts = num_experts
        self.group = group
        self.counts_group = counts_group if counts_group is not None else group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        assert num_experts % self.num_ranks == 0
        self.num_local = num_experts // self.num_ranks

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        counts_E = counts_E.clone()
        dist.all_reduce(counts_E, group=self.counts_group)
        return counts_E

    def plan(self, expert_ids_TK: torch.Tensor) -> ops.Plan:
        raise NotImplementedError("AllToAllDispatcher is not fusable: use dispatch and combine")

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor):
        P, e, E = self.num_ranks, self.num_local, self.num_experts
        T, K = expert_ids_TK.shape
        dev = x_TD.device
        # 1. destinations: token t goes to rank p iff one of its experts lives there; the send
        #    order (rank-major, token order inside a rank's block) is sorted before the sync
        to_TP = torch.zeros(T, P, dtype=torch.bool, device=dev).scatter_(1, expert_ids_TK // e, True)
        home = slot_plan(torch.arange(P, device=dev).expand(T, P), to_TP, P)
        tokens_E = ops.expert_counts(expert_ids_TK, E)
        # weights and global expert ids of each token (ids as floats: exact below 2^24)
        meta_TK2 = torch.cat([weights_TK, expert_ids_TK.to(weights_TK.dtype)], 1)
        # per destination rank: [rows sent to it, slots for each of its experts]
        send_P1 = torch.cat([home.counts_E.unsqueeze(1), tokens_E.view(P, e)], 1)
        recv_P1 = torch.empty_like(send_P1)
        dist.all_to_all_single(recv_P1, send_P1, group=self.group)
        sizes = torch.cat([send_P1[:, 0], recv_P1[:, 0], recv_P1[:, 1:].sum().view(1)])
        sizes = sizes.tolist()   # sync: split sizes for the all-to-alls and the row counts
        send_splits, recv_splits, num_rows = sizes[:P], sizes[P:2 * P], sizes[-1]
        # 2. send buffer: one gather; the metadata goes first, so the receiver sorts it while the
        #    rows are in flight
        home = kept_rows(home, sum(send_splits))
        x_SD = ops.dispatch(x_TD, home)
        meta_NK2 = all_to_all_single_autograd(ops.dispatch(meta_TK2, home), recv_splits,
                                              send_splits, self.group)
        x_ND = all_to_all_single_autograd(x_SD, recv_splits, send_splits, self.group)
        # 3. on the receiving side (while the rows are in flight): every received row to each
        #    local expert it chose, grouped by local expert; then one gather
        weights_NK, ids_NK = meta_NK2.split(K, dim=1)
        ids_NK = ids_NK.detach().long()
        first = self.rank * e
        mine_NK = (ids_NK >= first) & (ids_NK < first + e)
        local = kept_rows(slot_plan(ids_NK - first, mine_NK, e), num_rows)
        x_RD = ops.dispatch(x_ND, local)
        return x_RD, EPPlan(home, local, weights_NK, send_splits, recv_splits, tokens_E)

    def combine(self, y_RD: torch.Tensor, plan: EPPlan, weights_TK: torch.Tensor) -> torch.Tensor:
        """`weights_TK` went with the rows in dispatch (plan.weights_NK); applied here on the
        experts' side, so each token's partial sum crosses once per rank, not once per expert."""
        # 4. weighted partial sum of each received row's local experts (fp32 accumulation)
        z_ND = ops.combine(y_RD, plan.local, plan.weights_NK)
        if y_RD.shape[0] == 0:
            # nothing received: keep the rows' all-to-all in the graph so its backward (a
            # collective the other ranks wait on) still runs on this rank
            z_ND = z_ND + (y_RD * 0).sum()   # * 0 first: a materialized (not expanded) grad
        # 5. partial sums home, splits mirrored
        z_SD = all_to_all_single_autograd(z_ND, plan.send_splits, plan.recv_splits, self.group)
        # 6. sum of a token's partials (one per rank it went to), in rank order
        return _SumPartials.apply(z_SD, plan.home)

    def tokens_per_expert(self, plan: EPPlan) -> torch.Tensor:
        """[E]: assignments of this rank's tokens to every (global) expert."""
        return plan.tokens_E


class _SumPartials(torch.autograd.Function):
    """y_TD[t] = sum of the rows `home` sent token t to (its partial sums, back from each rank).
    Backward hands dy_TD[t] to each of them: a gather, nothing kept but the plan's indices (the
    combine op with unit weights would keep z_SD for a weight gradient nobody needs)."""

    @staticmethod
    def forward(ctx, z_SD, home: ops.Plan):
        ctx.save_for_backward(home.slot_of_row_R)
        ctx.num_ranks = home.top_k
        ones_TP = z_SD.new_ones(home.row_of_slot_S.numel() // home.top_k, home.top_k)
        return ops.combine(z_SD, home, ones_TP)

    @staticmethod
    def backward(ctx, dy_TD):
        slot_of_row_S, = ctx.saved_tensors
        return dy_TD[slot_of_row_S // ctx.num_ranks], None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertShard(nn.Module):
    """This ep rank's experts [r*e, (r+1)*e): `gate_up`/`down` are DTensors Shard(0) over `ep`
    (same names and global shapes as Experts', so checkpoints are layout-free); forward runs the
    grouped experts on the local shard with the counts AllToAllDispatcher hands it. `grad_scale`
    multiplies the weight gradients only (see `parallelize`: under FSDP it is 1 / ep)."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh, grad_scale: float = 1.0):
        super().__init__()
        self.backend = experts.backend
        self.grad_scale = grad_scale
        for name in ("gate_up", "down"):
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]),
                                             requires_grad=full.requires_grad))

    def forward(self, x_RD: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up.to_local(), self.down.to_local()
        if self.grad_scale != 1.0:
            gate_up = _ScaleGrad.apply(gate_up, self.grad_scale)
            down = _ScaleGrad.apply(down, self.grad_scale)
        return ops.expert_swiglu(x_RD, counts_e, gate_up, down, self.backend)

    def fuses_dispatch(self, x_TD: torch.Tensor) -> bool:
        return False


def moe_modules(model: nn.Module) -> list[MoE]:
    return [model] if isinstance(model, MoE) else [m for m in model.modules() if isinstance(m, MoE)]


def apply_ep(model: nn.Module, mesh: DeviceMesh, *, grad_scale: float = 1.0,
             counts_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Give every MoE an ExpertShard over mesh["ep"] (rank r keeps experts [r*e, (r+1)*e); weights
    taken from ep rank 0) and an AllToAllDispatcher. Call before FSDP. `counts_group`: where the
    balance loss's counts are summed (default: the ep group)."""
    ep_mesh = mesh["ep"]
    P = ep_mesh.size()
    for moe in moe_modules(model):
        if moe.cfg.capacity_factor is not None:
            raise ValueError(f"capacity_factor={moe.cfg.capacity_factor} is invalid with ep={P}: "
                             "expert parallelism is dropless only (capacity_factor=None)")
        if moe.cfg.num_experts % P:
            raise ValueError(f"ep={P} is invalid: must divide num_experts={moe.cfg.num_experts}")
        moe.experts = ExpertShard(moe.experts, ep_mesh, grad_scale)
        moe.dispatcher = AllToAllDispatcher(moe.cfg.num_experts, ep_mesh.get_group(), counts_group)
    return model
