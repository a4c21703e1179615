"""Launcher of the decode step's router (triton_router_kernels.py): the float32 logits, the top-k
and the softmax of the plain softmax router in two launches (one with DROPLESS_DECODE_FUSION=1: the
top-k in the logits kernel's last program per token block) where the torch ops take three or four
(each ~2-5 us of a launch-bound step, even in a CUDA graph), optionally with the MoE layer's RMSNorm
before it folded into the first (norm_route_topk). Inference only (no autograd); no host
sync and shapes fixed by the inputs, so CUDA graphs capture it; the torch ops stay the reference
(dropless/serve/moe_decode.py `route`).

Legend: T tokens, D model dim, E experts, K top-k, P split-D partials.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from dropless.ops.device import counters, decode_fusion, num_sms, pdl_launch, pow2

# The logits grid: each program accumulates BLOCK_T x BLOCK_E x BLOCK_D float32 products (at most
# TILE: 32 registers a thread at 4 warps); the experts' blocks shrink, then D is split, until the
# grid holds WAVES programs per multiprocessor (at T = 1 the router's 512 KB at the Qwen3-30B-A3B
# shape is read by ~500 programs instead of a few). A first guess, not yet measured on a GPU.
TILE = 4096
MAX_BLOCK_T, MAX_BLOCK_D = 8, 512
WAVES = 4


@functools.cache
def _kernels():
    from dropless.ops import triton_router_kernels
    return triton_router_kernels


def _num_sms(device: torch.device) -> int:
    return num_sms(device.index) if device.type == "cuda" else 1



def logits_tiles(T: int, E: int, D: int, sms: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_D, D_SPLIT) of the logits grid for `sms` multiprocessors."""
    block_t, block_d = min(pow2(T), MAX_BLOCK_T), min(pow2(D), MAX_BLOCK_D)
    block_e = max(1, min(pow2(E), TILE // (block_t * block_d)))
    target = WAVES * sms
    token_blocks = -(-T // block_t)
    while block_e > 1 and token_blocks * -(-E // block_e) < target:
        block_e //= 2
    programs = token_blocks * -(-E // block_e)
    chunks = -(-D // block_d)
    split = min(chunks, max(1, target // programs))
    return block_t, block_e, block_d, -(-chunks // split) * block_d


def _route(x_TD: Tensor, weight_ED: Tensor, top_k: int, norm_topk_prob: bool, route_scale: float,
           norm_weight: Tensor | None = None, eps: float = 0.0
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    T, D = x_TD.shape
    E = weight_ED.shape[0]
    assert weight_ED.shape[1] == D and 1 <= top_k <= E
    weights_TK = torch.empty(T, top_k, device=x_TD.device, dtype=torch.float32)
    ids_TK = torch.empty(T, top_k, device=x_TD.device, dtype=torch.int64)
    h_TD = None if norm_weight is None else x_TD.new_empty(T, D)
    if T == 0:
        return weights_TK, ids_TK, h_TD
    if x_TD.stride(1) != 1:
        x_TD = x_TD.contiguous()
    weight_ED = weight_ED.contiguous()
    block_t, block_e, block_d, d_split = logits_tiles(T, E, D, _num_sms(x_TD.device))
    P = -(-D // d_split)
    part_PTE = torch.empty(P, T, E, device=x_TD.device, dtype=torch.float32)
    kernels = _kernels()
    block = pow2(E)
    fused = decode_fusion("topk")
    grid = (-(-T // block_t), -(-E // block_e), P)
    # 1. the logits, as P split-D partials (and the normalised x, with a norm); fused: then 2.
    # in the last program of each token block
    kernels.router_logits_kernel[grid](
        x_TD, weight_ED, part_PTE, x_TD if norm_weight is None else norm_weight,
        x_TD if h_TD is None else h_TD, T, E, D, x_TD.stride(0), d_split, eps,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, NORM=norm_weight is not None,
        weights_ptr=weights_TK, ids_ptr=ids_TK,
        cnt_ptr=counters(x_TD.device, grid[0]) if fused else ids_TK, K=top_k,
        route_scale=route_scale, TOPK=fused, NORM_TOPK=norm_topk_prob, TOPK_BLOCK_E=block,
        num_warps=4, **pdl_launch(x_TD.device, preload=True))
    if fused:
        return weights_TK, ids_TK, h_TD
    # 2. per token: the partials' sum, K rounds of argmax, the softmax (one warp: the rounds'
    # maxima by shuffles alone; fused, the logits kernel's 4 warps sum the softmax in another
    # order, the same ids and the weights within a rounding)
    kernels.router_topk_kernel[(T,)](
        part_PTE, weights_TK, ids_TK, T, E, top_k, P, route_scale,
        NORM_TOPK=norm_topk_prob, BLOCK_E=block, num_warps=1 if block <= 512 else 4,
        **pdl_launch(x_TD.device))
    return weights_TK, ids_TK, h_TD


@torch.library.custom_op("dropless::route_topk", mutates_args=())
def route_topk(x_TD: Tensor, weight_ED: Tensor, top_k: int, norm_topk_prob: bool,
               route_scale: float) -> tuple[Tensor, Tensor]:
    """(weights_TK float32, expert_ids_TK int64) of the softmax router: logits = x @ W^T in
    float32, their top-k (slot k the k-th largest), the softmax over those k (`norm_topk_prob`) or
    over all E gathered at them, times `route_scale`. x and W in any float dtypes but float64."""
    return _route(x_TD, weight_ED, top_k, norm_topk_prob, route_scale)[:2]


@route_topk.register_fake
def _(x_TD, weight_ED, top_k, norm_topk_prob, route_scale):
    T = x_TD.shape[0]
    return (x_TD.new_empty(T, top_k, dtype=torch.float32),
            x_TD.new_empty(T, top_k, dtype=torch.int64))


@torch.library.custom_op("dropless::norm_route_topk", mutates_args=())
def norm_route_topk(x_TD: Tensor, norm_weight: Tensor, eps: float, weight_ED: Tensor,
                    top_k: int, norm_topk_prob: bool,
                    route_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """route_topk of h = F.rms_norm(x, norm_weight, eps) (rounded to x's dtype), and h itself
    [T, D] contiguous: the MoE layer's norm, its router and its experts' input in two launches."""
    return _route(x_TD, weight_ED, top_k, norm_topk_prob, route_scale, norm_weight, eps)


@norm_route_topk.register_fake
def _(x_TD, norm_weight, eps, weight_ED, top_k, norm_topk_prob, route_scale):
    T = x_TD.shape[0]
    return (x_TD.new_empty(T, top_k, dtype=torch.float32),
            x_TD.new_empty(T, top_k, dtype=torch.int64), x_TD.new_empty(x_TD.shape))
