"""The engine's decode step through the model's blocks: one new token per row, each row at its own
position, with the work that is the same for every layer done once per step.

Legend: b rows, D model dim, H heads, G kv heads, Dh head dim, S cache length, C kv latent rank,
N no-rope / P rope head dim (MLA), Dv value head dim.

The same math as Block.forward over a KV cache (dropless/model.py, dropless/mla.py), in fewer
kernels, because a decode step is launch-bound (each kernel costs ~2-3 us, even in a CUDA graph):
1. once per step (`Step`): RoPE tables with the rotation's sign folded into sin, the additive mask
   of each row's visible cache positions, the flat cache indices each row writes;
2. per layer: norms as one F.rms_norm in the activation dtype (it accumulates in float32
   internally, as RMSNorm's upcast does); GQA's prologue (per-head q/k norms, RoPE, both cache
   writes) as one Triton kernel on CUDA (dropless/ops/triton_rope.py), elsewhere as the torch ops
   it fuses: RoPE as flip + multiply-add (no chunk/cat), cache writes as index_copy_ into a flat
   view; one SDPA per layer with the step's mask (grouped queries as query rows of their kv head,
   never expanded), the residual folded into the output projection's addmm and the MoE combine's
   baddbmm.
Results agree with the model's forward to rounding (tests/test_serve_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.model import Attention, RMSNorm, rope_tables
from dropless.ops.device import has_triton
from dropless.ops.triton_rope import norm_rope_cache   # imports triton when first run
from dropless.serve.moe_decode import moe_decode


@dataclass
class Step:
    cos_b1R: torch.Tensor     # float32 [b, 1, R], R the rope dim (broadcast over heads)
    sin_b1R: torch.Tensor     # float32, sign folded in: [-sin, sin] of the half-split pairs
    mask_b11S: torch.Tensor   # additive, activation dtype: 0 where visible, -inf after the row
    write_idx: torch.Tensor   # int64 flat cache rows: GQA [b * G] into [b*G*S, Dh]; MLA [b]


def make_step(cfg, positions_b: torch.Tensor, max_len: int, dtype: torch.dtype) -> Step:
    """The per-step state shared by every layer (a handful of kernels, once)."""
    b, dev = positions_b.shape[0], positions_b.device
    rope_dim = cfg.rope_dim
    cos, sin = rope_tables(rope_dim, positions_b.unsqueeze(1), cfg.rope_theta)   # [b, 1, R]
    sign = torch.ones(rope_dim, device=dev).index_fill_(0, torch.arange(rope_dim // 2,
                                                                        device=dev), -1.0)
    keys_S = torch.arange(max_len, device=dev)
    mask = torch.zeros(b, 1, 1, max_len, device=dev, dtype=dtype).masked_fill_(
        keys_S > positions_b.view(b, 1, 1, 1), float("-inf"))
    rows = torch.arange(b, device=dev).unsqueeze(1)
    if cfg.attention == "mla":
        idx = (rows.squeeze(1) * max_len + positions_b)
    else:
        G = cfg.num_kv_heads
        heads = torch.arange(G, device=dev)
        idx = ((rows * G + heads) * max_len + positions_b.unsqueeze(1)).reshape(-1)
    return Step(cos, sin * sign, mask, idx)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm.forward in one op when the weight has the input's dtype (bf16 in, bf16 out, float32
    statistics: the same values as the module's upcast-normalise-downcast)."""
    if norm.weight.dtype != x.dtype:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def rope(x: torch.Tensor, step: Step) -> torch.Tensor:
    """apply_rope for x [b, heads, R]: x * cos + rotate_half(x) * sin in float32, where
    rotate_half's halves swap by a flip of the [2, R/2] view and its sign is in step.sin_b1R."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * step.cos_b1R, swapped, step.sin_b1R).to(x.dtype)


def fused_prologue(q: torch.Tensor) -> bool:
    """Whether gqa's per-head norms, RoPE and cache writes run as one Triton kernel: on CUDA. The
    CPU serves with the torch ops (tests run the kernel there too, under the Triton interpreter,
    by patching this function)."""
    return q.is_cuda and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and has_triton()


def linear_add(lin: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x) for 2-D x; one addmm for a bias-free nn.Linear."""
    if type(lin) is nn.Linear and lin.bias is None:
        return torch.addmm(residual, x, lin.weight.t())
    return residual + lin(x)


def fuse_qkv(attn) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of GQA's q, k and v projections stacked into one, or None where they are not
    three plain nn.Linear alike in dtype and bias (int4 projections, MLA): at a few rows each
    projection is a launch-bound GEMV, and one GEMV over the stack reads the same bytes. A copy:
    the model's own weights stay as they are (attention's q/k/v are ~2% of an MoE's bytes)."""
    lins = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(type(lin) is nn.Linear for lin in lins) or \
            len({(lin.weight.dtype, lin.bias is None) for lin in lins}) != 1:
        return None
    bias = None if lins[0].bias is None else torch.cat([lin.bias.detach() for lin in lins])
    return torch.cat([lin.weight.detach() for lin in lins]), bias


def gqa(attn: Attention, x_bD: torch.Tensor, residual_bD, cache, step: Step,
        qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """`qkv`: fuse_qkv(attn), the three projections as one."""
    cfg = attn.cfg
    b = x_bD.shape[0]
    H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    if qkv is not None:   # views of one [b, (H + 2G) Dh] product
        q, k, v = F.linear(x_bD, *qkv).split([H * Dh, G * Dh, G * Dh], dim=-1)
    else:
        q, k, v = attn.q_proj(x_bD), attn.k_proj(x_bD), attn.v_proj(x_bD)
    if attn.q_norm is not None and cfg.qk_norm_scope == "proj":
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    q, k, v = q.view(b, H, Dh), k.view(b, G, Dh), v.view(b, G, Dh)
    head_norm = attn.q_norm is not None and cfg.qk_norm_scope == "head"
    k_cache, v_cache = cache                                        # [b, G, S, Dh]
    if fused_prologue(q):   # the norms, RoPE and both cache writes in one kernel
        q_w, k_w = (attn.q_norm.weight, attn.k_norm.weight) if head_norm else (None, None)
        q = norm_rope_cache(q, k, v, q_w, k_w, cfg.norm_eps, step.cos_b1R, step.sin_b1R,
                            k_cache, v_cache, step.write_idx)
    else:
        if head_norm:
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        q, k = rope(q, step), rope(k, step)
        k_cache.view(-1, Dh).index_copy_(0, step.write_idx, k.reshape(b * G, Dh).to(k_cache.dtype))
        v_cache.view(-1, Dh).index_copy_(0, step.write_idx, v.reshape(b * G, Dh).to(v_cache.dtype))
    # grouped queries as query rows of their kv head: [b, G, H/G, Dh] against the cache as stored
    out = F.scaled_dot_product_attention(q.view(b, G, H // G, Dh), k_cache.to(q.dtype),
                                         v_cache.to(q.dtype), attn_mask=step.mask_b11S)
    return linear_add(attn.o_proj, out.reshape(b, H * Dh), residual_bD)


def mla(attn, x_bD: torch.Tensor, residual_bD, cache, step: Step, qkv=None) -> torch.Tensor:
    """MLAttention's absorbed form over the compressed cache (latent [b, S, C], rope key
    [b, S, P]), all heads as query rows of the one shared latent "head"."""
    cfg = attn.cfg
    b = x_bD.shape[0]
    H, C = cfg.num_heads, cfg.kv_lora_rank
    N, P, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_nope, q_rope = attn._query(x_bD).view(b, H, N + P).split([N, P], dim=-1)
    latent_bC, k_rope_bP = attn.kv_a_proj(x_bD).split([C, P], dim=-1)
    latent_bC = rms_norm(attn.kv_a_norm, latent_bC)
    q_rope, k_rope = rope(q_rope, step), rope(k_rope_bP.unsqueeze(1), step)
    latent_cache, rope_cache = cache
    latent_cache.view(-1, C).index_copy_(0, step.write_idx, latent_bC.to(latent_cache.dtype))
    rope_cache.view(-1, P).index_copy_(0, step.write_idx, k_rope.view(b, P).to(rope_cache.dtype))
    w_uk, w_uv = attn.kv_b_proj.weight.view(H, N + Dv, C).split([N, Dv], dim=1)
    q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
    query = torch.cat([q_latent, q_rope], dim=-1).unsqueeze(1)      # [b, 1, H, C + P]
    latent = latent_cache.to(query.dtype).unsqueeze(1)               # [b, 1, S, C]
    key = torch.cat([latent, rope_cache.to(query.dtype).unsqueeze(1)], dim=-1)
    out_latent = F.scaled_dot_product_attention(query, key, latent, attn_mask=step.mask_b11S,
                                                scale=attn.scale).squeeze(1)   # [b, H, C]
    out = torch.einsum("bhc,hvc->bhv", out_latent, w_uv)
    return linear_add(attn.o_proj, out.reshape(b, H * Dv), residual_bD)


def decode_blocks(model, x_bD: torch.Tensor, caches, step: Step, moe_path: str | None = None,
                  qkvs: list | None = None) -> torch.Tensor:
    """The model's blocks for one token per row: x_bD the embedded tokens -> the last hidden.
    `qkvs`: per layer, fuse_qkv of its attention (or None)."""
    attention = mla if model.cfg.attention == "mla" else gqa
    for layer, cache, qkv in zip(model.layers, caches, qkvs or [None] * len(caches)):
        x_bD = attention(layer.attn, rms_norm(layer.attn_norm, x_bD), x_bD, cache, step, qkv)
        h_bD = rms_norm(layer.ffn_norm, x_bD)
        if layer.is_moe:
            x_bD = moe_decode(layer.ffn, h_bD, moe_path, residual=x_bD)
        else:
            x_bD = x_bD + layer.ffn(h_bD)
    return x_bD
