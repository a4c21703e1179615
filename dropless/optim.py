"""The optimizer and the learning-rate schedule of `dropless train`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dropless.config import TrainConfig
from dropless.ops import triton_adamw


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps (the last at lr), then cosine decay from lr, reaching
    lr * min_lr_ratio at step == steps, one past the last step a run takes (steps - 1): that step's
    lr is above the floor by at most (lr - min) * pi^2 / (4 n^2), n = steps - warmup. (Ending the
    cosine on the last step itself would make a one-step run, or one decay step, train at the floor.)"""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainConfig, *, working_copies: bool = False
                   ) -> "MasterAdamW":
    """AdamW; weight decay only on matrices that are not embeddings (norm gains, biases and
    embeddings are exempt; the router's bias is a buffer, so the optimizer never sees it).
    `working_copies` (bf16-mixed on one process): the matmul weights train through bf16 copies
    (MasterAdamW)."""
    embeddings = _embedding_ids(model)
    decay, no_decay = [], []
    for p in model.parameters():   # tied weights appear once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    # the fused CUDA kernel: one launch for all tensors (plain tensors only: FSDP's DTensors
    # take the default foreach path)
    fused = all(p.is_cuda and type(p.data) is torch.Tensor for p in decay + no_decay) or None
    return MasterAdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}],
                       masters=matmul_weights(model) if working_copies else {},
                       lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def matmul_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights autocast casts to bf16 at every use: linear layers' and experts' weights. Not
    the router's (fp32 by the layer contract), nor a weight tied to an embedding (its lookup reads
    fp32), nor norms and biases."""
    from dropless.experts import Experts

    embeddings = _embedding_ids(model)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in embeddings:
            weights[f"{name}.weight"] = module.weight
        elif isinstance(module, Experts):
            weights.update({f"{name}.gate_up": module.gate_up, f"{name}.down": module.down})
    return weights


class MasterAdamW(torch.optim.AdamW):
    """AdamW whose `masters` (name -> fp32 parameter of the model) train through bf16 working
    copies: the forward runs on `working_params()` (torch.func.functional_call), their gradients
    stay bf16, and the step updates each master, its moments and its copy in one pass
    (dropless.ops.triton_adamw). The numerics are autocast's: the copy is bf16(master), as
    autocast's cast is. The model, the optimizer's state and checkpoints hold fp32 as before; the
    copies are made at the first step (after a checkpoint is loaded). Every other parameter takes
    the plain AdamW step. With no masters this is AdamW."""

    def __init__(self, groups, *, masters: dict[str, nn.Parameter], **kwargs):
        super().__init__(groups, **kwargs)
        self.masters = masters
        self.working: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}   # fp32 gradient sums over micro-batches
        self.copy_scale: torch.Tensor | None = None   # the copies' clipping divisor, this step
        self._name_of = {id(p): name for name, p in masters.items()}

    def _copy_of(self, p: torch.Tensor) -> torch.Tensor | None:
        return self.working.get(self._name_of.get(id(p)))

    def _grad_of_copy(self, p: torch.Tensor) -> torch.Tensor | None:
        name = self._name_of.get(id(p))
        return self.sums[name] if name in self.sums else self.working[name].grad

    @torch.no_grad()
    def accumulate(self) -> None:
        """After each micro-batch's backward when there are several: the copies' bf16 gradients
        move into fp32 sums, as autocast's fp32 gradients accumulate (not summed in bf16)."""
        for name, w in self.working.items():
            if w.grad is not None:
                if name in self.sums:
                    self.sums[name].add_(w.grad)
                else:
                    self.sums[name] = w.grad.float()
                w.grad = None

    def working_params(self) -> dict[str, torch.Tensor]:
        if not self.working and self.masters:
            self.working = {name: p.detach().to(torch.bfloat16).requires_grad_()
                            for name, p in self.masters.items()}
        return self.working

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient of this step: the working copies' and the other parameters'."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad if self._copy_of(p) is None else self._grad_of_copy(p)
                if g is not None:
                    grads.append(g)
        return grads

    @torch.no_grad()
    def divide_gradients(self, scale: torch.Tensor) -> None:
        """This step's gradients divided by `scale` (clipping), as the step reads them: the fused
        AdamW's grad_scale, or in place for fp32 gradients without it. The working copies' bf16
        gradients are divided inside their step, in fp32 (in place they would round to bf16)."""
        self.copy_scale = scale
        if self.defaults.get("fused"):
            self.grad_scale = scale
        else:
            grads = [p.grad for group in self.param_groups for p in group["params"]
                     if p.grad is not None]   # a master with a copy has no .grad
            torch._foreach_div_(grads, scale)

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "MasterAdamW takes no closure"
        super().step()   # the parameters without a copy (the masters' own .grad stays None)
        scale, self.copy_scale, self.grad_scale = self.copy_scale, None, None
        for group in self.param_groups:
            todo = [(p, w, g) for p in group["params"] if (w := self._copy_of(p)) is not None
                    and (g := self._grad_of_copy(p)) is not None]
            for p, _, _ in todo:
                state = self.state[p]
                if not state:   # AdamW's own state layout: checkpoints load into either class
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not todo:
                continue
            counts = [self.state[p]["step"] for p, _, _ in todo]
            torch._foreach_add_(counts, 1.0)
            for (p, w, g), count in zip(todo, counts):
                state = self.state[p]
                triton_adamw.step(p, g, state["exp_avg"], state["exp_avg_sq"], w, count,
                                  scale, lr=group["lr"], weight_decay=group["weight_decay"],
                                  betas=group["betas"], eps=group["eps"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.sums = {}
        for w in self.working.values():
            w.grad = None


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` together (any mix of dtypes), accumulated in fp32."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for gs in by_dtype.values() for n in torch._foreach_norm(gs, 2, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
