"""AdamW for fp32 master weights trained through bf16 working copies (`bf16-mixed`).

Under autocast every matmul casts its fp32 weight to bf16 in the forward (and the compiled step
casts again in the backward, where it recomputes rather than keeps the copy), and every bf16
weight gradient is cast to fp32 before AdamW reads it: ~7.6 ms of the 88 ms `medium` step on an
H200, beside 12.4 ms of fp32 AdamW. With working copies the matmuls read bf16 weights that already
exist, their gradients stay bf16, and one pass per tensor does the AdamW update of the master, its
moments and the refreshed copy: 28 bytes per parameter, every byte read or written once.

`step` is the CUDA kernel (Triton), `step_reference` the same formula in PyTorch ops: the CPU path
and the test oracle. Both follow torch.optim.AdamW (decoupled weight decay, bias corrections, eps
added to the corrected root), with the gradient divided by `scale` first (the clipping divisor,
as the fused AdamW's grad_scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 4096


def step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor, count: Tensor,
         scale: Tensor | None, *, lr: float, weight_decay: float, betas: tuple[float, float],
         eps: float) -> None:
    """In place: p, m, v (fp32) and w = bf16(p), from g (w's gradient: bf16, or fp32 when summed
    over micro-batches); `count`: the step number after this step, a one-element fp32 tensor on
    p's device."""
    fn = launch if p.is_cuda else step_reference
    fn(p, g, m, v, w, count, scale, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def launch(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor, count: Tensor,
           scale: Tensor | None, *, lr: float, weight_decay: float, betas: tuple[float, float],
           eps: float) -> None:
    """The Triton kernel (on CPU tensors under the Triton interpreter, in the tests)."""
    from dropless.ops import triton_adamw_kernels

    assert all(t.is_contiguous() for t in (p, g, m, v, w))
    n = p.numel()
    triton_adamw_kernels.adamw_kernel[(max(1, -(-n // BLOCK)),)](
        p, g, m, v, w, count, count if scale is None else scale, n, lr, weight_decay,
        betas[0], betas[1], eps, HAS_SCALE=scale is not None, BLOCK=BLOCK, num_warps=8)


def step_reference(p: Tensor, g: Tensor, m: Tensor, v: Tensor, w: Tensor, count: Tensor,
                   scale: Tensor | None, *, lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float) -> None:
    g = g.float() if scale is None else g.float() / scale
    beta1, beta2 = betas
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bias1 = 1.0 - torch.pow(beta1, count)
    bias2 = 1.0 - torch.pow(beta2, count)
    p.sub_(lr / bias1 * m / (v.sqrt() / bias2.sqrt() + eps))
    w.copy_(p)
