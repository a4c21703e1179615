"""The Triton kernel of `triton_adamw.py`. Imported only by it."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, step_ptr, scale_ptr, numel, lr, weight_decay,
                 beta1, beta2, eps, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """One AdamW step of fp32 master weights p from working-copy gradients g (bf16, or fp32 sums
    over micro-batches) and moments m, v (fp32); writes p, m, v and the working copy w = bf16(p).
    `step_ptr`: the step count after this step (fp32, on the device: no host sync); `scale_ptr`:
    the gradients' divisor."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    step = tl.load(step_ptr)
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr)
    p = tl.load(p_ptr + idx, mask=ok, other=0.0)
    m = tl.load(m_ptr + idx, mask=ok, other=0.0)
    v = tl.load(v_ptr + idx, mask=ok, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    bias1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias2 = 1.0 - tl.exp(step * tl.log(beta2))
    p = p - (lr / bias1) * m / (tl.sqrt(v) / tl.sqrt(bias2) + eps)
    tl.store(p_ptr + idx, p, mask=ok)
    tl.store(m_ptr + idx, m, mask=ok)
    tl.store(v_ptr + idx, v, mask=ok)
    tl.store(w_ptr + idx, p.to(w_ptr.dtype.element_ty), mask=ok)
