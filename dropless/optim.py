"""The optimizer and the learning-rate schedule of `dropless train`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dropless.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices that are not embeddings (norm gains, biases and
    embeddings are exempt; the router's bias is a buffer, so the optimizer never sees it)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():   # tied weights appear once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    # the fused CUDA kernel: one launch for all tensors (plain tensors only: FSDP's DTensors
    # take the default foreach path)
    fused = all(p.is_cuda and type(p.data) is torch.Tensor for p in decay + no_decay) or None
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95), fused=fused)
