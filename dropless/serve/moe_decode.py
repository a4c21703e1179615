"""The MoE layer for decode-sized token counts: no sort, no plan, no host sync.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows.

The training path (dropless.moe.MoE.forward) sorts the T*K assignments by expert and runs a
grouped matmul over expert-contiguous rows: right for thousands of tokens, pure overhead for one.
Here, with T at most the decode batch, one of two shapes of the same math is used:

- "triton" (few rows, on CUDA): two Triton GEMVs that read each row's expert weights in place by
  id (dropless/ops/triton_gemv.py); reads only the experts used, once.
- "gather" (few rows, elsewhere): copy the chosen experts' weights into [R, D, 2F] and [R, F, D] and
  run two batched GEMVs; reads only the experts used, twice.
- "dense" (T*K comparable to E): every expert on every token, [E, T, D] x [E, D, 2F], then zero
  routing weight for unchosen (token, expert) pairs; reads every expert once, with no gather.

Both combine with a [T, 1, K] (or [T, 1, E]) batched matmul in the activation dtype, as the training
path's combine does, so outputs agree with it to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropless.experts import Experts
from dropless.moe import MoE
from dropless.ops.triton_gemv import experts_gemv   # imports triton only when first run
from dropless.router import Router, select_experts


def route(router: Router, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK, expert_ids_TK) exactly as Router.forward selects them, without the balance
    and z losses (a dozen kernels per layer that decoding throws away)."""
    cfg = router.cfg
    dtype = torch.promote_types(x_TD.dtype, torch.float32)
    logits_TE = F.linear(x_TD.to(dtype), router.weight.to(dtype))
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    return select_experts(scores_TE, router.bias, cfg)


def choose_path(num_tokens: int, top_k: int, num_experts: int, device_type: str = "cpu") -> str:
    """Few rows (under half the experts): the chosen experts only, read in place by the Triton
    GEMVs on CUDA, gathered elsewhere; else every expert, dense."""
    if 2 * num_tokens * top_k >= num_experts:
        return "dense"
    return "triton" if device_type == "cuda" else "gather"


def experts_gather(x_TD, weights_TK, expert_ids_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    T, K = expert_ids_TK.shape
    ids_R = expert_ids_TK.reshape(-1)
    x_R1D = x_TD.repeat_interleave(K, dim=0).unsqueeze(1)
    h_R1F2 = torch.bmm(x_R1D, gate_up_EDF2[ids_R])
    gate, up = h_R1F2.chunk(2, dim=-1)
    y_R1D = torch.bmm(F.silu(gate) * up, down_EFD[ids_R])
    w_T1K = weights_TK.to(y_R1D.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_R1D.view(T, K, -1)).squeeze(1)


def experts_dense(x_TD, weights_TK, expert_ids_TK, gate_up_EDF2, down_EFD) -> torch.Tensor:
    T, E = x_TD.shape[0], gate_up_EDF2.shape[0]
    h_ETF2 = torch.matmul(x_TD.unsqueeze(0), gate_up_EDF2)
    gate, up = h_ETF2.chunk(2, dim=-1)
    y_ETD = torch.bmm(F.silu(gate) * up, down_EFD)
    # routing weights scattered to [T, E]; the unchosen experts' outputs get weight 0
    w_TE = torch.zeros(T, E, dtype=weights_TK.dtype, device=x_TD.device).scatter(
        1, expert_ids_TK, weights_TK)
    w_T1E = w_TE.to(y_ETD.dtype).unsqueeze(1)
    return torch.bmm(w_T1E, y_ETD.transpose(0, 1)).squeeze(1)


def moe_decode(moe: MoE, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """y = the layer's output for x [..., D] (no aux losses); `path` forces "triton", "gather" or
    "dense"."""
    x_TD = x.reshape(-1, moe.cfg.dim)
    weights_TK, expert_ids_TK = route(moe.router, x_TD)
    experts = moe.experts
    if not isinstance(experts, Experts):   # int4 experts (dropless.quant) decode from packed weights
        y_TD = experts.decode(x_TD, expert_ids_TK, weights_TK)
    else:
        path = path or choose_path(x_TD.shape[0], moe.cfg.top_k, moe.cfg.num_experts,
                                   x.device.type)
        run = {"triton": experts_gemv, "gather": experts_gather, "dense": experts_dense}[path]
        y_TD = run(x_TD, weights_TK, expert_ids_TK, experts.gate_up, experts.down)
    if moe.shared is not None:
        shared_TD = moe.shared(x_TD)
        if moe.shared_gate is not None:
            shared_TD = shared_TD * torch.sigmoid(moe.shared_gate(x_TD))
        y_TD = y_TD + shared_TD
    return y_TD.view(x.shape)
