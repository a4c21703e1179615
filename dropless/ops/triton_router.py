"""Fused router (Triton): logits -> scores (softmax | sigmoid) -> top-k (+ selection bias) -> weights.

Legend: T tokens, E experts, K top-k.

One kernel replaces softmax/sigmoid, the bias add, topk, gather, the renormalization and the scale
(`router.Router` runs them as ~6 PyTorch ops over [T, E]). Backward w.r.t. the logits reruns the
same few ops in PyTorch on the saved logits and chosen ids (they are [T, E]-sized and cheap), so
gradients are exactly those of `Router`. Group-limited routing is not fused.

Not wired into `Router` yet: it has not been timed on a GPU (BENCHMARKS.md, round 2). The balance
and z losses still need the full probabilities / logits, computed as in `Router`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def _kernels():
    from dropless.ops import triton_router_kernels
    return triton_router_kernels


def _weights_of(logits_TE, ids_TK, softmax: bool, norm: bool, scale: float) -> Tensor:
    """The Router's weights as differentiable PyTorch ops, given the chosen experts."""
    scores_TE = logits_TE.softmax(dim=-1) if softmax else logits_TE.sigmoid()
    weights_TK = scores_TE.gather(1, ids_TK)
    if norm:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=1e-20)
    return weights_TK * scale


@torch.library.custom_op("dropless::route_topk", mutates_args=())
def _route_op(logits_TE: Tensor, bias_E: Tensor | None, top_k: int, softmax: bool, norm: bool,
              scale: float) -> tuple[Tensor, Tensor]:
    """Returns weights_TK (fp32) and expert_ids_TK (int64)."""
    T, E = logits_TE.shape
    logits_TE = logits_TE.float().contiguous()
    weights = logits_TE.new_empty(T, top_k)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    block_e = max(16, 1 << (E - 1).bit_length())
    block_t = max(1, min(64, 4096 // block_e))
    bias = logits_TE if bias_E is None else bias_E.float().contiguous()
    _kernels().route_topk_kernel[(max(1, -(-T // block_t)),)](
        logits_TE, bias, weights, ids, T, E, scale, K=top_k,
        KP=max(2, 1 << (top_k - 1).bit_length()), SOFTMAX=softmax, HAS_BIAS=bias_E is not None,
        NORM=norm, BLOCK_T=block_t, BLOCK_E=block_e)
    return weights, ids


@_route_op.register_fake
def _(logits_TE, bias_E, top_k, softmax, norm, scale):
    T = logits_TE.shape[0]
    return (logits_TE.new_empty(T, top_k, dtype=torch.float32),
            logits_TE.new_empty(T, top_k, dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    logits_TE, _, _, softmax, norm, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits_TE, output[1])
    ctx.args = (softmax, norm, scale)


def _backward(ctx, dweights_TK, _dids):
    logits_TE, ids_TK = ctx.saved_tensors
    with torch.enable_grad():
        leaf = logits_TE.detach().float().requires_grad_()
        (dlogits,) = torch.autograd.grad(_weights_of(leaf, ids_TK, *ctx.args), leaf, dweights_TK)
    return dlogits.to(logits_TE.dtype), None, None, None, None, None


_route_op.register_autograd(_backward, setup_context=_setup_context)


def route_topk(logits_TE: Tensor, top_k: int, *, score_func: str = "softmax",
               bias_E: Tensor | None = None, norm_topk_prob: bool = True,
               route_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(weights_TK, expert_ids_TK) as `Router` computes them from its logits (no group limit)."""
    return _route_op(logits_TE, bias_E, top_k, score_func == "softmax", norm_topk_prob,
                     float(route_scale))
