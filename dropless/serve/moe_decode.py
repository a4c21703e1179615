"""The MoE layer for decode-sized token counts: no sort, no plan, no host sync.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows.

The training path (dropless.moe.MoE.forward) sorts the T*K assignments by expert and runs a
grouped matmul over expert-contiguous rows: right for thousands of tokens, pure overhead for one.
Here, with T at most the decode batch, one of two shapes of the same math is used:

- "triton" (few rows, on CUDA): two Triton GEMVs that read each row's expert weights in place by
  id, the second scaling by the routing weight, then the K-sum in fp32 (dropless/ops/gemv.py,
  the kernel the int4 experts decode with); reads only the experts used, once. On weights laid
  out k-major (kmajor_experts: serve and generate load so), two kernels that read whole rows and
  sum the K slots in the down GEMV's own program.
- "gather" (few rows, elsewhere): copy the chosen experts' weights into [R, D, 2F] and [R, F, D] and
  run two batched GEMVs; reads only the experts used, twice.
- "dense" (T*K comparable to E): every expert on every token, [E, T, D] x [E, D, 2F], then zero
  routing weight for unchosen (token, expert) pairs; reads every expert once, with no gather.

int4 experts (dropless.quant) run per slot from their packed weights (the same GEMV kernels) while
experts see about one row each, past that through the grouped int4 kernels over a plan, which read
each expert once.

"gather" and "dense" combine with a [T, 1, K] (or [T, 1, E]) batched matmul in the activation dtype,
as the training path's combine does; outputs agree with it to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropless.experts import Experts
from dropless.model import RMSNorm
from dropless.moe import MoE
from dropless.ops.device import has_triton
from dropless.ops.gemv import experts_decode   # imports triton when first run
from dropless.ops.triton_router import norm_route_topk, route_topk   # import triton when first run
from dropless.router import Router, select_experts

FUSED_ROUTER_MAX_TOKENS = 64   # the router kernel's grid is laid out for decode-sized T


def fused_router(x_TD: torch.Tensor) -> bool:
    """Whether route's plain softmax top-k runs as the two Triton kernels of
    dropless/ops/triton_router.py: on CUDA, for decode-sized T. The CPU routes with the torch ops
    (tests run the kernels there too, under the Triton interpreter, by patching this function)."""
    return x_TD.is_cuda and x_TD.dtype in (torch.float32, torch.bfloat16, torch.float16) and (
        x_TD.shape[0] <= FUSED_ROUTER_MAX_TOKENS) and has_triton()


def plain_softmax(router: Router) -> bool:
    """Softmax top-k without a selection bias or groups: what the router kernels compute."""
    cfg = router.cfg
    return cfg.score_func == "softmax" and router.bias is None and cfg.num_groups is None


def route(router: Router, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, expert_ids_TK) as Router.forward selects them, without the balance and z
    losses (a dozen kernels per layer that decoding throws away).

    The logits are float32 from x as it comes: on CUDA one bf16 GEMM with float32 output (the
    products of bf16 values are exact in float32, as after Router's upcast), elsewhere the upcast.
    Plain softmax top-k (no bias, no groups) takes the top-k of the logits, whose order is the
    scores', and renormalises as a softmax over those k logits, which equals the renormalised
    scores: three kernels where the general path takes nine; on CUDA (`fused_router`) two."""
    cfg = router.cfg
    plain = plain_softmax(router)
    if plain and fused_router(x_TD):
        return route_topk(x_TD, router.weight, cfg.top_k, cfg.norm_topk_prob,
                          float(cfg.route_scale))
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    if x_TD.device.type == "cuda" and x_TD.dtype in (torch.bfloat16, torch.float16) and (
            router.weight.dtype == x_TD.dtype):
        logits_TE = torch.mm(x_TD, router.weight.t(), out_dtype=torch.float32)
    else:
        logits_TE = F.linear(x_TD.to(dtype), router.weight.to(dtype))
    if plain:
        # unsorted: the slots' order does not matter to the sum, and the sort is a kernel
        top_TK, expert_ids_TK = logits_TE.topk(cfg.top_k, dim=-1, sorted=False)
        if cfg.norm_topk_prob:
            weights_TK = top_TK.softmax(-1)
        else:
            weights_TK = logits_TE.softmax(-1).gather(1, expert_ids_TK)
        return (weights_TK if cfg.route_scale == 1 else weights_TK * cfg.route_scale), expert_ids_TK
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    return select_experts(scores_TE, router.bias, cfg)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward in one op when the weight has the input's dtype (bf16 in, bf16 out, float32
    statistics: the same values as the module's upcast-normalise-downcast)."""
    if norm.weight.dtype != x.dtype:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def norm_route(norm: RMSNorm, router: Router, x_TD: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights_TK, expert_ids_TK, h_TD) of route(router, h_TD), h = rms_norm(norm, x): where
    route takes the router kernels, the norm goes into their first launch (no kernel of its own)."""
    cfg = router.cfg
    if plain_softmax(router) and fused_router(x_TD):
        return norm_route_topk(x_TD, norm.weight, norm.eps, router.weight, cfg.top_k,
                               cfg.norm_topk_prob, float(cfg.route_scale))
    h_TD = rms_norm(norm, x_TD)
    return *route(router, h_TD), h_TD


def kmajor_experts(model: torch.nn.Module, device_types: tuple[str, ...] = ("cuda",)) -> int:
    """Lay every plain (unquantized) expert weight out k-major, in place, on these device types
    (where the decode GEMVs run; tests add "cpu"): the same shapes and values, the memory of the
    transposed tensor, so that the decode GEMVs read each output's weights as one run
    (gemv.decode_experts_kmajor: 1.26-1.27x faster at batch 1, BENCHMARKS.md round 22). Every
    path reads such weights (matmul, bmm and grouped_mm take them strided); for inference only:
    the fused optimizer and checkpoint writes want contiguous weights. A contiguous tensor is
    relaid in its own memory, one expert at a time (an expert's block of memory is the same in
    both layouts), so the move needs one expert's memory to spare, not one tensor's (6 MB
    against 805 MB at the Qwen3-30B-A3B shape: a model that nearly fills the GPU still loads).
    Returns how many moved."""
    from dropless.ops.gemv import kmajor
    moved = 0
    for module in model.modules():
        if isinstance(module, Experts):
            for p in (module.gate_up, module.down):
                if type(p.data) is torch.Tensor and p.device.type in device_types and \
                        not kmajor(p):   # (not a DTensor shard)
                    p.data = _transposed_in_place(p.data) if p.is_contiguous() else \
                        p.data.transpose(1, 2).contiguous().transpose(1, 2)
                    moved += 1
    return moved


def _transposed_in_place(w_EIO: torch.Tensor) -> torch.Tensor:
    """w (contiguous [E, I, O]) with the same values k-major, in w's own memory: expert by expert,
    its block copied out transposed, then written back over itself."""
    E, I, O = w_EIO.shape
    w_EOI = w_EIO.as_strided((E, O, I), (I * O, I, 1))   # the same memory, read k-major
    for e in range(E):
        w_EOI[e].copy_(w_EIO[e].t().clone())   # the copy is whole before the write
    return w_EOI.transpose(1, 2)


DENSE_MAX_TOKENS = 128   # "dense" does experts / top-k times the FLOPs; past this, they show


def choose_path(num_tokens: int, top_k: int, num_experts: int, device_type: str = "cpu",
                grouped: bool = False) -> str:
    """Few rows (under half the experts): the chosen experts only, read in place by the Triton
    GEMVs on CUDA, gathered elsewhere; up to DENSE_MAX_TOKENS every expert, dense (reading each
    expert once costs more than its FLOPs on an H200 up to ~190 tokens); past that, or on a CPU
    (where the FLOPs cost), if `grouped` (a prefill: not captured in a CUDA graph), the layer's
    own path."""
    if 2 * num_tokens * top_k >= num_experts:
        few = num_tokens <= DENSE_MAX_TOKENS and device_type == "cuda"
        return "grouped" if grouped and not few else "dense"
    return "triton" if device_type == "cuda" else "gather"


def experts_gather(x_TD, expert_ids_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """y_TKD: each token through each of its experts, the weights gathered per row."""
    T, K = expert_ids_TK.shape
    ids_R = expert_ids_TK.reshape(-1)
    x_R1D = x_TD.repeat_interleave(K, dim=0).unsqueeze(1)
    h_R1F2 = torch.bmm(x_R1D, gate_up_EDF2[ids_R])
    gate, up = h_R1F2.chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, down_EFD[ids_R]).view(T, K, -1)


def experts_dense(x_TD, gate_up_EDF2, down_EFD) -> torch.Tensor:
    """y_TED: every token through every expert."""
    h_ETF2 = torch.matmul(x_TD.unsqueeze(0), gate_up_EDF2)
    gate, up = h_ETF2.chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, down_EFD).transpose(0, 1)


def moe_decode(moe: MoE, x: torch.Tensor, path: str | None = None,
               residual: torch.Tensor | None = None, grouped: bool = False,
               norm: RMSNorm | None = None) -> torch.Tensor:
    """y = the layer's output for x [..., D] (no aux losses), plus `residual` if given (folded
    into the combine: one kernel less); `path` forces "triton", "gather", "dense" or "grouped";
    `grouped`: whether choose_path may pick it; `norm`: the RMSNorm before the layer, applied to
    x here (in the router's first kernel where it runs)."""
    x_TD = x.reshape(-1, moe.cfg.dim)
    T = x_TD.shape[0]
    path = path or choose_path(T, moe.cfg.top_k, moe.cfg.num_experts, x.device.type, grouped)
    if path == "grouped":   # MoE.forward: routing, sort, grouped matmul, shared experts
        y = moe(x if norm is None else rms_norm(norm, x))[0]
        return y if residual is None else residual + y
    if norm is None:
        weights_TK, expert_ids_TK = route(moe.router, x_TD)
    else:   # from here on x is the layer's input
        weights_TK, expert_ids_TK, x_TD = norm_route(norm, moe.router, x_TD)
    experts = moe.experts
    quantized = not isinstance(experts, Experts)
    residual_TD = None if residual is None else residual.reshape(T, moe.cfg.dim)
    if quantized:   # int4 experts (dropless.quant) from packed weights: per slot while experts
        # see about one row each, past that the grouped kernels over a plan (each expert read once)
        # (a capacity factor's plan drops slots: decode keeps them all, as before)
        if experts.decodes(x_TD, moe.cfg.top_k) or not (moe.dispatcher.fusable and
                                                         experts.fuses_dispatch(x_TD)):
            y_TD = experts.decode(x_TD, expert_ids_TK, weights_TK, residual_TD)
        else:
            plan = moe.dispatcher.plan(expert_ids_TK)
            y_TD = experts.fused(x_TD, plan, weights_TK)
            y_TD = y_TD if residual_TD is None else residual_TD + y_TD
    elif path == "triton":   # the residual added in the kernel that sums the slots
        y_TD = experts_decode(x_TD, expert_ids_TK, weights_TK, experts.gate_up, experts.down,
                              residual_TD)
    else:
        if path == "dense":
            # routing weights scattered to [T, E]; the unchosen experts' outputs get weight 0
            w_TX = torch.zeros(T, moe.cfg.num_experts, dtype=weights_TK.dtype,
                               device=x.device).scatter(1, expert_ids_TK, weights_TK)
            y_TXD = experts_dense(x_TD, experts.gate_up, experts.down)
        else:
            w_TX, y_TXD = weights_TK, experts_gather(x_TD, expert_ids_TK, experts.gate_up,
                                                     experts.down)
        # the combine: a [T, 1, K] (or [T, 1, E]) bmm in the activation dtype, as training's
        w_T1X = w_TX.to(y_TXD.dtype).unsqueeze(1)
        if residual is None:
            y_TD = torch.bmm(w_T1X, y_TXD).squeeze(1)
        else:
            y_TD = torch.baddbmm(residual_TD.unsqueeze(1), w_T1X, y_TXD).squeeze(1)
    if moe.shared is not None:
        shared_TD = moe.shared(x_TD)
        if moe.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(moe.shared_gate(x_TD))
        y_TD = y_TD + shared_TD
    return y_TD.view(x.shape)
