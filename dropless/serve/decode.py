"""The engine's decode step through the model's blocks: T new tokens per row (1 when decoding; a
short prompt chunk when prefilling), each row at its own positions, with the work that is the same
for every layer done once per step.

Legend: b rows, T tokens per row, n = b * T, D model dim, H heads, G kv heads, Dh head dim, S cache
length, Q = T * (query rows per token) attention query rows per cache row, C kv latent rank, N
no-rope / P rope head dim (MLA), Dv value head dim.

The same math as Block.forward over a KV cache (dropless/model.py, dropless/mla.py), in fewer
kernels, because a decode step is launch-bound (each kernel costs ~2-3 us, even in a CUDA graph):
1. once per step (`Step`): RoPE tables with the rotation's sign folded into sin, the additive mask
   of each row's visible cache positions, the flat cache indices each row writes;
2. per layer: norms as one F.rms_norm in the activation dtype (it accumulates in float32
   internally, as RMSNorm's upcast does); GQA's prologue (per-head q/k norms, RoPE, both cache
   writes) as one Triton kernel on CUDA (dropless/ops/triton_rope.py), elsewhere as the torch ops
   it fuses: RoPE as flip + multiply-add (no chunk/cat), cache writes as index_copy_ into a flat
   view; one SDPA per layer with the step's mask (grouped queries as query rows of their kv head,
   never expanded; at one token per row on CUDA a split-KV Triton kernel that takes each row's
   position instead of the mask, dropless/ops/triton_attention.py), the residual folded into the
   output projection's addmm and the MoE combine's baddbmm; at a few rows on CUDA the attention
   norm + q|k|v projection and the output projection + residual as one GEMV launch each over the
   weights as stored (dropless/ops/triton_linear.py); int4 projections (dropless.quant) stacked
   q|k|v as one int4 product, and the residual added in the int4 kernels' last launch (the split
   partials' sum), as the int4 experts add theirs. With device.decode_fusion (not yet the
   default): those sums, the router's top-k and split-KV attention's combine in the kernels' own
   last programs, the attention norm inside the int4 q|k|v GEMV, and o_proj's weight asked into
   L2 by the attention prologue.
Results agree with the model's forward to rounding (tests/test_serve_decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.experts import Experts
from dropless.model import Attention, RMSNorm, rope_tables
from dropless.ops.device import decode_fusion, has_triton
from dropless.ops import triton_linear
from dropless.ops.awq import awq_linear
from dropless.ops.triton_attention import decode_attention   # imports triton when first run
from dropless.ops.triton_rope import norm_rope_cache
from dropless.quant.modules import QuantizedLinear
from dropless.serve.moe_decode import moe_decode, rms_norm


@dataclass
class Step:
    cos_n1R: torch.Tensor     # float32 [n, 1, R], R the rope dim (broadcast over heads)
    sin_n1R: torch.Tensor     # float32, sign folded in: [-sin, sin] of the half-split pairs
    mask_b1QS: torch.Tensor   # additive, activation dtype: 0 where visible, -inf after the token;
                              # [b, 1, 1, S] when T = 1 (broadcast over a row's query rows)
    write_idx: torch.Tensor   # int64 flat cache rows: GQA [n * G] into [b*G*S, Dh]; MLA [n]
    positions_bT: torch.Tensor  # int64 [b, T], each token's (the fused attention masks by them)
    tokens: int = 1           # T
    length: int = 0           # cache positions attention reads: [0, length), a bucket <= S


def make_step(cfg, positions: torch.Tensor, max_len: int, dtype: torch.dtype,
              length: int | None = None) -> Step:
    """The per-step state shared by every layer (a handful of kernels, once). positions [b] (one
    token per row) or [b, T] (row-major tokens: x rows are (row, token) pairs); attention reads
    cache positions [0, length) (default: all max_len); writes may go anywhere in the cache."""
    positions_bT = positions.view(positions.shape[0], -1)
    (b, T), dev = positions_bT.shape, positions.device
    rope_dim = cfg.rope_dim
    cos, sin = rope_tables(rope_dim, positions_bT.reshape(-1, 1), cfg.rope_theta)   # [n, 1, R]
    sign = torch.ones(rope_dim, device=dev).index_fill_(0, torch.arange(rope_dim // 2,
                                                                        device=dev), -1.0)
    length = length or max_len
    keys_S = torch.arange(length, device=dev)
    mask = torch.zeros(b, 1, T, length, device=dev, dtype=dtype).masked_fill_(
        keys_S > positions_bT.view(b, 1, T, 1), float("-inf"))
    if T > 1:   # each token's mask for each of its query rows: MLA's heads, GQA's group
        per_token = cfg.num_heads // (1 if cfg.attention == "mla" else cfg.num_kv_heads)
        mask = mask.unsqueeze(3).expand(b, 1, T, per_token, length).reshape(b, 1, -1, length)
    rows = torch.arange(b, device=dev).unsqueeze(1)
    if cfg.attention == "mla":
        idx = (rows * max_len + positions_bT).reshape(-1)
    else:
        G = cfg.num_kv_heads
        heads = torch.arange(G, device=dev)
        idx = ((rows.unsqueeze(2) * G + heads) * max_len + positions_bT.unsqueeze(2)).reshape(-1)
    return Step(cos, sin * sign, mask, idx, positions_bT, T, length)


MLA_QUERY_ROWS = 4096   # a short prefill's query rows (tokens x heads) through MLA's latent head


def step_tokens_cap(model) -> int:
    """The most tokens the decode step's path should take at once (a short prefill). int4 experts
    decode per slot, re-reading an expert for each of its rows, which pays only while slots <=
    experts; MLA's mask has a row per (token, head), and DeepSeek-V3 has 128 heads."""
    caps = [m.cfg.num_experts // m.cfg.top_k for m in (lay.ffn for lay in model.layers
                                                       if lay.is_moe)
            if not isinstance(m.experts, Experts)]
    if model.cfg.attention == "mla":
        caps.append(MLA_QUERY_ROWS // model.cfg.num_heads)
    return max(1, min(caps)) if caps else 1 << 62


def rope(x: torch.Tensor, step: Step) -> torch.Tensor:
    """apply_rope for x [n, heads, R]: x * cos + rotate_half(x) * sin in float32, where
    rotate_half's halves swap by a flip of the [2, R/2] view and its sign is in step.sin_n1R."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * step.cos_n1R, swapped, step.sin_n1R).to(x.dtype)


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and has_triton()


def fused_prologue(q: torch.Tensor) -> bool:
    """Whether gqa's per-head norms, RoPE and cache writes run as one Triton kernel: on CUDA. The
    CPU serves with the torch ops (tests run the kernel there too, under the Triton interpreter,
    by patching this function)."""
    return _on_gpu(q)


def fused_attention(q: torch.Tensor) -> bool:
    """Whether gqa's attention at one token per row runs as the split-KV Triton kernel: on CUDA,
    for head dims tl.dot takes (a power of two >= 16); tests patch it on, as fused_prologue."""
    Dh = q.shape[-1]
    return fused_prologue(q) and Dh >= 16 and Dh & (Dh - 1) == 0


def fused_linear(x: torch.Tensor) -> bool:
    """Whether a bias-free projection of x's rows (with the norm before it or the residual after
    it) runs as the Triton GEMV (dropless/ops/triton_linear.py): on CUDA, at decode-sized row
    counts; tests patch it on, as fused_prologue."""
    return _on_gpu(x) and 1 <= x.shape[0] <= triton_linear.MAX_TOKENS


def linear_add(lin: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + lin(x) for 2-D x; one addmm (or the GEMV, `fused_linear`) for a bias-free
    nn.Linear; an int4 QuantizedLinear adds the residual in its kernels' last launch."""
    if type(lin) is nn.Linear and lin.bias is None:
        if fused_linear(x) and lin.weight.dtype == x.dtype:
            return triton_linear.linear_rows(x, lin.weight, None, 0.0, residual)
        return torch.addmm(residual, x, lin.weight.t())
    if isinstance(lin, QuantizedLinear):
        return lin(x, residual)
    return residual + lin(x)


def norm_qkv(norm: RMSNorm, x_nD: torch.Tensor, qkv) -> torch.Tensor:
    """The attention norm and the fused q|k|v projection [n, (H + 2G) Dh]: one GEMV launch for
    a bias-free plain stack at decode-sized n (`fused_linear`), or for an int4 stack with
    device.decode_fusion("norm"), else rms_norm then the product (F.linear, or awq_linear)."""
    weight, bias = qkv
    if isinstance(weight, tuple):   # int4: (qweight, qzeros, scales) of the stack
        if decode_fusion("norm") and norm.weight.dtype == x_nD.dtype:   # the norm in the GEMV
            y = awq_linear(x_nD, *weight, norm=(norm.weight, norm.eps))
        else:
            y = awq_linear(rms_norm(norm, x_nD), *weight)
        return y if bias is None else y + bias.to(y.dtype)
    if bias is None and fused_linear(x_nD) and weight.dtype == x_nD.dtype:
        return triton_linear.linear_rows(x_nD, weight, norm.weight, norm.eps, None)
    return F.linear(rms_norm(norm, x_nD), weight, bias)


def _stacked(lins: list[nn.Module]):
    """The q|k|v weights as one: plain [(H + 2G) Dh, D] rows, or an int4 triple whose packed
    output columns are concatenated (each projection's columns are whole int32s)."""
    if all(type(lin) is nn.Linear for lin in lins) and len({lin.weight.dtype for lin in lins}) == 1:
        return torch.cat([lin.weight.detach() for lin in lins])
    if all(isinstance(lin, QuantizedLinear) for lin in lins) and \
            len({lin.weight.qzeros.shape[-2] for lin in lins}) == 1:
        return tuple(torch.cat(parts, dim=-1) for parts in zip(*(lin.weight.packed
                                                                  for lin in lins)))
    return None


def fuse_qkv(attn) -> tuple[torch.Tensor | tuple, torch.Tensor | None] | None:
    """(weight, bias) of GQA's q, k and v projections stacked into one, or None where they are not
    three plain nn.Linear alike in dtype, or three int4 QuantizedLinear alike in group size, with
    biases on all or none (MLA: None): at a few rows each projection is a launch-bound GEMV, and
    one GEMV over the stack reads the same bytes. A copy: the model's own weights stay as they are
    (attention's q/k/v are ~2% of an MoE's bytes)."""
    lins = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if any(lin is None for lin in lins) or len({lin.bias is None for lin in lins}) != 1:
        return None
    weight = _stacked(lins)
    if weight is None:
        return None
    bias = None if lins[0].bias is None else torch.cat([lin.bias.detach() for lin in lins])
    return weight, bias


@torch.no_grad()
def restack_qkv(model, qkvs: list) -> None:
    """fuse_qkv of each layer again, into the stacks `qkvs` already holds (the buffers an
    engine's captured graphs read): after the weights changed in place (an optimizer step,
    load_state_dict)."""
    def flat(pair):
        return [t for part in pair or () for t in (part if isinstance(part, tuple) else (part,))]

    for layer, kept in zip(model.layers, qkvs):
        for old, new in zip(flat(kept), flat(fuse_qkv(layer.attn))):
            if old is not None:
                old.copy_(new)


def o_proj_bytes(o_proj: nn.Module) -> torch.Tensor | None:
    """What the attention prologue asks into L2 with device.decode_fusion("prefetch"): the output
    projection's weight (plain), or its packed int4 weight, read after attention, while memory
    would idle (attention reads only the cache); else None."""
    if not decode_fusion("prefetch"):
        return None
    if type(o_proj) is nn.Linear and o_proj.weight.is_contiguous():
        return o_proj.weight.detach()
    if isinstance(o_proj, QuantizedLinear):
        return o_proj.weight.packed[0]
    return None


def gqa(attn: Attention, norm: RMSNorm, residual_nD, cache, step: Step,
        qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """residual + attention(norm(residual)); `qkv`: fuse_qkv(attn), the three projections as
    one."""
    cfg = attn.cfg
    n, T = residual_nD.shape[0], step.tokens
    b = n // T
    H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    if qkv is not None:   # views of one [n, (H + 2G) Dh] product
        q, k, v = norm_qkv(norm, residual_nD, qkv).split([H * Dh, G * Dh, G * Dh], dim=-1)
    else:
        x_nD = rms_norm(norm, residual_nD)
        q, k, v = attn.q_proj(x_nD), attn.k_proj(x_nD), attn.v_proj(x_nD)
    if attn.q_norm is not None and cfg.qk_norm_scope == "proj":
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    q, k, v = q.view(n, H, Dh), k.view(n, G, Dh), v.view(n, G, Dh)
    head_norm = attn.q_norm is not None and cfg.qk_norm_scope == "head"
    k_cache, v_cache = cache                                        # [b, G, S, Dh]
    if fused_prologue(q):   # the norms, RoPE and both cache writes in one kernel
        q_w, k_w = (attn.q_norm.weight, attn.k_norm.weight) if head_norm else (None, None)
        q = norm_rope_cache(q, k, v, q_w, k_w, cfg.norm_eps, step.cos_n1R, step.sin_n1R,
                            k_cache, v_cache, step.write_idx, o_proj_bytes(attn.o_proj))
    else:
        if head_norm:
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        q, k = rope(q, step), rope(k, step)
        k_cache.view(-1, Dh).index_copy_(0, step.write_idx, k.reshape(n * G, Dh).to(k_cache.dtype))
        v_cache.view(-1, Dh).index_copy_(0, step.write_idx, v.reshape(n * G, Dh).to(v_cache.dtype))
    S = step.length   # the cache's first S positions (views)
    if T == 1 and fused_attention(q):   # each row's position masks in the kernel; cache as stored
        out = decode_attention(q, k_cache, v_cache, step.positions_bT.view(b), S)
        return linear_add(attn.o_proj, out.view(n, H * Dh), residual_nD)
    # grouped queries as query rows of their kv head, [b, G, T * H/G, Dh], against the cache as
    # stored (never expanded); the transposes are views at T = 1
    q_bGQD = q.view(b, T, G, H // G, Dh).transpose(1, 2).reshape(b, G, -1, Dh)
    out = F.scaled_dot_product_attention(q_bGQD, k_cache[:, :, :S].to(q.dtype),
                                         v_cache[:, :, :S].to(q.dtype), attn_mask=step.mask_b1QS)
    out = out.view(b, G, T, H // G, Dh).transpose(1, 2).reshape(n, H * Dh)
    return linear_add(attn.o_proj, out, residual_nD)


def mla(attn, norm: RMSNorm, residual_nD, cache, step: Step, qkv=None) -> torch.Tensor:
    """residual + MLAttention(norm(residual)) in its absorbed form over the compressed cache
    (latent [b, S, C], rope key [b, S, P]), every token's heads as query rows of the one shared
    latent "head"."""
    cfg = attn.cfg
    x_nD = rms_norm(norm, residual_nD)
    n = x_nD.shape[0]
    b = n // step.tokens
    H, C = cfg.num_heads, cfg.kv_lora_rank
    N, P, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_nope, q_rope = attn._query(x_nD).view(n, H, N + P).split([N, P], dim=-1)
    latent_nC, k_rope_nP = attn.kv_a_proj(x_nD).split([C, P], dim=-1)
    latent_nC = rms_norm(attn.kv_a_norm, latent_nC)
    q_rope, k_rope = rope(q_rope, step), rope(k_rope_nP.unsqueeze(1), step)
    latent_cache, rope_cache = cache
    latent_cache.view(-1, C).index_copy_(0, step.write_idx, latent_nC.to(latent_cache.dtype))
    rope_cache.view(-1, P).index_copy_(0, step.write_idx, k_rope.view(n, P).to(rope_cache.dtype))
    w_uk, w_uv = attn.kv_b_proj.weight.view(H, N + Dv, C).split([N, Dv], dim=1)
    q_latent = torch.einsum("nhk,hkc->nhc", q_nope, w_uk)
    query = torch.cat([q_latent, q_rope], dim=-1).view(b, 1, -1, C + P)   # [b, 1, T*H, C + P]
    S = step.length   # the cache's first S positions
    latent = latent_cache[:, :S].to(query.dtype).unsqueeze(1)              # [b, 1, S, C]
    key = torch.cat([latent, rope_cache[:, :S].to(query.dtype).unsqueeze(1)], dim=-1)
    out_latent = F.scaled_dot_product_attention(query, key, latent, attn_mask=step.mask_b1QS,
                                                scale=attn.scale).view(n, H, C)
    out = torch.einsum("nhc,hvc->nhv", out_latent, w_uv)
    return linear_add(attn.o_proj, out.reshape(n, H * Dv), residual_nD)


def decode_blocks(model, x_nD: torch.Tensor, caches, step: Step, moe_path: str | None = None,
                  qkvs: list | None = None) -> torch.Tensor:
    """The model's blocks for step.tokens tokens per row: x_nD the embedded tokens (rows in
    (row, token) order) -> their last hidden states. `qkvs`: per layer, fuse_qkv of its attention
    (or None)."""
    attention = mla if model.cfg.attention == "mla" else gqa
    for layer, cache, qkv in zip(model.layers, caches, qkvs or [None] * len(caches)):
        x_nD = attention(layer.attn, layer.attn_norm, x_nD, cache, step, qkv)
        if layer.is_moe:
            # a decode step (one token per row) stays off the layer's own path: it is graphed
            x_nD = moe_decode(layer.ffn, x_nD, moe_path, x_nD, grouped=step.tokens > 1,
                              norm=layer.ffn_norm)
        else:
            x_nD = x_nD + layer.ffn(rms_norm(layer.ffn_norm, x_nD))
    return x_nD
