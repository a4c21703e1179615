"""Plain PyTorch for every MoE op: the CPU path, the test oracle and the documentation.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows (T*K when dropless).
A "slot" is one (token, k) pair, numbered t*K + k; a "row" is a slot's place in expert-contiguous order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Plan:
    """Where every routed slot went. Built by `make_plan`; consumed by dispatch and combine."""

    slot_of_row_R: torch.Tensor    # int64 [R]: slot index of each row, rows sorted by expert
    row_of_slot_S: torch.Tensor    # int64 [T*K]: row of each slot (clamped to a valid row if dropped)
    keep_S: torch.Tensor | None    # bool [T*K]: False for slots dropped by capacity; None = dropless
    counts_E: torch.Tensor         # int64 [E]: rows per expert (after drops)
    top_k: int
    dropped: int = 0


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert: h = x @ gate_up; g, u = h.chunk(2); (silu(g) * u) @ down."""
    g, u = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down


def moe_loop(x_TD, weights_TK, expert_ids_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """The oracle: y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), one expert at a time.

    Slots with an expert id outside [0, E) (dropped ones) contribute nothing. Exact in float64.
    """
    y_TD = torch.zeros_like(x_TD)
    for e in range(gate_up_EDF2.shape[0]):
        token_idx, k_idx = torch.nonzero(expert_ids_TK == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        out = swiglu(x_TD[token_idx], gate_up_EDF2[e], down_EFD[e])
        w = weights_TK[token_idx, k_idx].to(out.dtype).unsqueeze(-1)
        y_TD = y_TD.index_add(0, token_idx, out * w)
    return y_TD


def swiglu_loop(x_RD, counts_E, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """Experts over expert-contiguous rows: a plain loop over x.split(counts).

    Splitting the weights with unbind (not w[e] in the loop) keeps backward from materialising a
    full-size zero gradient per expert.
    """
    counts = counts_E.tolist()  # sync: split sizes
    outs = [swiglu(x, gu, dn) for x, gu, dn in
            zip(x_RD.split(counts), gate_up_EDF2.unbind(0), down_EFD.unbind(0))]
    if not outs:
        return x_RD.new_empty(0, down_EFD.shape[-1])
    return torch.cat(outs)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how many entries of expert_ids hold each expert. An integer scatter_add of ones:
    exact and deterministic, and unlike torch.bincount (which reads the max back to size its
    output) it never syncs with a CUDA device."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def sort_key_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds every expert id: a radix sort makes one pass per
    byte of key, so uint8 ids sort in one pass where int64 ids take eight (same stable order)."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 2**15 else torch.int32


def make_plan(expert_ids_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> Plan:
    """Sort slots by expert (stable, so token order is kept inside each expert) and, if a capacity
    is given, drop every assignment past the first `capacity` of its expert, in token order."""
    T, K = expert_ids_TK.shape
    flat_S = expert_ids_TK.reshape(-1)
    # 1. expert-contiguous order; stable keeps token order within an expert
    slot_of_row = torch.argsort(flat_S.to(sort_key_dtype(num_experts)), stable=True)
    counts_E = expert_counts(flat_S, num_experts)
    keep_S, dropped = None, 0
    # 2. capacity: rank of each row inside its expert; rows ranked >= capacity are dropped
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_R = torch.arange(slot_of_row.numel(), device=flat_S.device) - starts_E[flat_S[slot_of_row]]
        keep_R = rank_R < capacity
        keep_S = torch.zeros_like(flat_S, dtype=torch.bool)
        keep_S[slot_of_row[keep_R]] = True
        slot_of_row = slot_of_row[keep_R]
        counts_E = counts_E.clamp(max=capacity)
        dropped = T * K - slot_of_row.numel()
    # 3. inverse permutation; dropped slots point at row 0 and are masked in combine
    row_of_slot = torch.zeros_like(flat_S).scatter_(
        0, slot_of_row, torch.arange(slot_of_row.numel(), device=flat_S.device))
    return Plan(slot_of_row, row_of_slot, keep_S, counts_E, K, dropped)


class _GatherRows(torch.autograd.Function):
    """out = src[idx] where every output row has one source row; backward gathers as well
    (grad_src = grad_out[inv], summed over `group` consecutive entries), so no atomics anywhere:
    results are bitwise identical run to run on any device."""

    @staticmethod
    def forward(ctx, src, idx, inv, inv_mask, group):
        ctx.save_for_backward(inv, inv_mask)
        ctx.group = group
        return src[idx]

    @staticmethod
    def backward(ctx, grad_out):
        inv, inv_mask = ctx.saved_tensors
        grad = grad_out[inv]
        if inv_mask is not None:
            grad = grad.masked_fill(~inv_mask.unsqueeze(-1), 0)
        if ctx.group > 1:
            grad = grad.view(-1, ctx.group, grad.shape[-1]).sum(1)
        return grad, None, None, None, None


def dispatch(x_TD: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Token rows -> expert-contiguous rows x_RD (one row per kept slot)."""
    token_of_row = plan.slot_of_row_R // plan.top_k
    return _GatherRows.apply(x_TD, token_of_row, plan.row_of_slot_S, plan.keep_S, plan.top_k)


def combine(y_RD: torch.Tensor, plan: Plan, weights_TK: torch.Tensor) -> torch.Tensor:
    """Expert rows -> tokens: y[t] = sum_k weights[t, k] * y_rows[row(t, k)], as a batched matmul
    (fp32 accumulation for low-precision inputs), never an index_add."""
    T, K = weights_TK.shape
    # no tokens: keep the graph connected to the weights. Under a capacity plan R is
    # data-dependent, unknown to torch.compile: taken as nonzero there, as it is whenever T > 0
    # (every capacity is >= 1); a plain `== 0` on it breaks a fullgraph compile. (Eager never
    # imports symbolic_shapes, which pulls in sympy: a compile has it loaded already.)
    if (torch.fx.experimental.symbolic_shapes.guard_or_false(y_RD.shape[0] == 0)
            if torch.compiler.is_compiling() else y_RD.shape[0] == 0):
        return (weights_TK.sum(-1, keepdim=True) * 0).to(y_RD.dtype).expand(T, y_RD.shape[-1])
    y_SD = _GatherRows.apply(y_RD, plan.row_of_slot_S, plan.slot_of_row_R, None, 1)
    if plan.keep_S is not None:
        y_SD = y_SD.masked_fill(~plan.keep_S.unsqueeze(-1), 0)
    w_T1K = weights_TK.to(y_RD.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_SD.view(T, K, -1)).squeeze(1)
