"""Top-k routing: softmax or sigmoid(+bias) scores, optional group limit, balance and z losses.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups.
Logits and scores are computed in float32 (float64 stays float64), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.config import MoEConfig
from dropless.ops.reference import expert_counts


@dataclass
class Routing:
    weights_TK: torch.Tensor       # float32 (or float64) routing weights, route_scale applied
    expert_ids_TK: torch.Tensor    # int64 chosen experts
    balance_loss: torch.Tensor     # scalar, coefficient applied
    z_loss: torch.Tensor           # scalar, coefficient applied


def balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, coef: float,
                 counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss coef * E * sum_i f_i * P_i; f_i = assignments to i / (T*K) (no gradient),
    P_i = mean router probability of i. A perfectly balanced router gives exactly `coef`.
    `counts_E` may be passed in when the assignments are counted elsewhere (e.g. globally)."""
    T, E = probs_TE.shape
    if counts_E is None:
        counts_E = expert_counts(expert_ids_TK, E)   # no sync, unlike bincount on CUDA
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp(min=1)
    return coef * E * (f_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: coef * mean_t logsumexp(logits_t)^2."""
    return coef * torch.logsumexp(logits_TE, dim=-1).square().mean()


def group_limited_mask(select_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep the experts of the best `topk_groups` groups; a group scores the sum of its top-2
    selection scores (top-1 for groups of one expert). Returns a bool mask [T, E]."""
    T, E = select_TE.shape
    per_group = select_TE.view(T, num_groups, E // num_groups)
    group_score_TG = per_group.topk(min(2, E // num_groups), dim=-1).values.sum(-1)
    best_groups = group_score_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    return keep_TG.repeat_interleave(E // num_groups, dim=1)


def select_experts(scores_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: MoEConfig):
    """(weights_TK, expert_ids_TK): top-k of the selection scores (scores + the selection-only
    bias, then the group limit); weights gathered from the unbiased scores, renormalised if
    `norm_topk_prob`, times `route_scale`. Shared by the Router and the decode path (serve)."""
    select_TE = scores_TE.detach()
    if bias_E is not None:
        select_TE = select_TE + bias_E.to(scores_TE.dtype)
    if cfg.num_groups is not None:
        keep_TE = group_limited_mask(select_TE, cfg.num_groups, cfg.topk_groups)
        select_TE = select_TE.masked_fill(~keep_TE, float("-inf"))
    expert_ids_TK = select_TE.topk(cfg.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, expert_ids_TK)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=1e-20)
    return weights_TK * cfg.route_scale, expert_ids_TK


class _UpcastLinear(torch.autograd.Function):
    """logits = x.to(dtype) @ w.to(dtype)^T, keeping x in its own dtype for backward (autograd
    would keep the upcast copy: T*D*4 bytes, twice a bf16 x) and upcasting it again there.
    Same products and casts as autograd's, so bitwise the same gradients.

    Autocast is off inside both passes: the router's logits are float32 by contract, and under
    bf16 autocast F.linear would otherwise run in bf16 while backward multiplies by the float32
    weight (a dtype clash)."""

    @staticmethod
    def forward(ctx, x_TD, weight_ED, dtype):
        ctx.save_for_backward(x_TD, weight_ED)
        ctx.dtype = dtype
        with torch.autocast(x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), weight_ED.to(dtype))

    @staticmethod
    def backward(ctx, dlogits_TE):
        x_TD, weight_ED = ctx.saved_tensors
        with torch.autocast(x_TD.device.type, enabled=False):
            dlogits_TE = dlogits_TE.to(ctx.dtype)
            dx_TD = (dlogits_TE @ weight_ED.to(ctx.dtype)).to(x_TD.dtype)
            dweight_ED = (dlogits_TE.t() @ x_TD.to(ctx.dtype)).to(weight_ED.dtype)
        return dx_TD, dweight_ED, None


class Router(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))
        # selection-only bias of aux-loss-free balancing; saved with checkpoints (None: off)
        self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=torch.float32)
                             if cfg.bias_update_rate > 0 else None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.cfg.dim ** -0.5)
        if self.bias is not None:
            self.bias.zero_()

    def _apply(self, fn, recurse=True):
        # the selection bias stays (at least) float32 when the module goes to bf16/fp16, as
        # from_hf keeps it: bf16 rounds a bias near 1 by up to 2^-8, more than the gaps between
        # experts' sigmoid scores, and changes which experts a served model picks
        bias = self.bias
        super()._apply(fn, recurse)
        if bias is not None and self.bias.element_size() < 4:
            self.bias = bias.to(self.bias.device, torch.float32)
        return self

    def forward(self, x_TD: torch.Tensor, global_counts=None) -> Routing:
        """`global_counts` (Dispatcher.global_counts): this call's counts [E] -> the whole batch's,
        over which the balance loss's f is taken; None = this call is the whole batch."""
        cfg = self.cfg
        compute_dtype = torch.promote_types(x_TD.dtype, torch.float32)
        logits_TE = _UpcastLinear.apply(x_TD, self.weight, compute_dtype)
        # 1. scores; probs_TE (rows summing to 1) feed the balance loss
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        # 2. top-k by the selection scores, weights from the unbiased scores
        weights_TK, expert_ids_TK = select_experts(scores_TE, self.bias, cfg)
        # zero (still in the graph) when a loss is off or there are no tokens to average over
        zero = logits_TE.sum() * 0
        has_tokens = x_TD.shape[0] > 0
        bal = zero
        if cfg.balance_loss_coef > 0:
            counts_E = expert_counts(expert_ids_TK, cfg.num_experts)   # no sync
            if global_counts is not None:
                # may be a collective: called on every rank, with or without tokens
                counts_E = global_counts(counts_E)
            if has_tokens:
                bal = balance_loss(probs_TE, expert_ids_TK, cfg.balance_loss_coef, counts_E)
        zl = z_loss(logits_TE, cfg.z_loss_coef) if cfg.z_loss_coef > 0 and has_tokens else zero
        return Routing(weights_TK, expert_ids_TK, bal, zl)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing, once per optimizer step: b += rate * sign(mean - load),
        re-centred to zero mean. `load_E` is the step's assignments per expert (global under DP)."""
        if self.bias is None:
            raise ValueError("update_bias needs bias_update_rate > 0 in the MoEConfig")
        load = load_E.to(self.bias.device, torch.float32)
        delta = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.bias += delta - delta.mean()
