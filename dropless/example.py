"""A small runnable example of the MoE layer (`dropless example`)."""

from __future__ import annotations

import torch

from dropless import MoE, MoEConfig


def run_example(num_tokens: int = 4096, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=256, hidden_dim=512, num_experts=16, top_k=2, z_loss_coef=1e-3)
    moe = MoE(cfg)
    x = torch.randn(num_tokens // 256, 256, cfg.dim)
    y, aux = moe(x)
    (y.square().mean() + aux.balance_loss + aux.z_loss).backward()
    print(f"MoE layer: {cfg.num_experts} experts, top-{cfg.top_k}, dim {cfg.dim}, "
          f"expert hidden {cfg.hidden_dim}")
    print(f"input  {tuple(x.shape)} -> output {tuple(y.shape)} {y.dtype}")
    print(f"tokens per expert: {aux.tokens_per_expert.tolist()} "
          f"(sum {int(aux.tokens_per_expert.sum())} = {x.shape[0] * x.shape[1]} tokens x top-{cfg.top_k})")
    print(f"balance loss {aux.balance_loss.item():.5f} (coef {cfg.balance_loss_coef}; "
          f"exactly the coef when balanced), z-loss {aux.z_loss.item():.5f}, dropped {aux.dropped}")
