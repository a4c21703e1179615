"""The MoE transformer language model: embedding, blocks (attention + MoE or dense SwiGLU), final
norm, LM head; with a KV cache for decoding.

Legend: B batch, T sequence (new tokens), S cached sequence, H heads, G kv heads, Dh head dim,
D model dim, V vocab, L MoE layers, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.config import ModelConfig
from dropless.experts import SwiGLU
from dropless.moe import MoE


@dataclass
class ModelAux:
    balance_loss: torch.Tensor        # summed over MoE layers, coefficient applied
    z_loss: torch.Tensor              # summed over MoE layers, coefficient applied
    tokens_per_expert: torch.Tensor   # int64 [L, E]: per MoE layer, assignments per expert


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 for low-precision inputs, return the input dtype
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


ROPE_TABLE_MAX = 2**16   # positions kept as a table: rope_dim 256 fits ROPE_TABLE_NUMEL whole
ROPE_TABLE_NUMEL = 2**24   # per table (cos or sin, fp32): 64 MiB, whatever the rope width


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin [*, head_dim] for the half-split rotation (pairs i and i + head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float64) / head_dim)
    # fp64 angles keep far positions exact; they are rounded to fp32 before the halves are
    # repeated, so the transient fp64 tensors are half the width of the tables
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    cos, sin = angles.cos().float(), angles.sin().float()
    del angles
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh]; cos/sin [B, T, Dh] (broadcast over heads)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Per-layer key/value buffers [B, G, S_max, Dh] plus each row's filled length.

    Rows may hold prompts of different lengths: `lengths_B` says where each row writes next."""

    def __init__(self, model: "Transformer", batch_size: int, max_len: int,
                 device=None, dtype=None):
        p = next(model.parameters())
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"KV cache max_len={max_len} is invalid: must be <= the model's "
                             f"max_seq_len={model.cfg.max_seq_len}")
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device or p.device)
        self.layers = [layer.attn.new_cache(batch_size, max_len, device or p.device, dtype or p.dtype)
                       for layer in model.layers]
        self.max_len = max_len


def causal_mask(positions_BT: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool [B, 1, T, S]: query at position p sees keys at positions <= p."""
    keys = torch.arange(num_keys, device=positions_BT.device)
    return (keys <= positions_BT.unsqueeze(-1)).unsqueeze(1)


# Whole-sequence causal attention (training; prefill without a cache) runs cuDNN's fused kernel on
# CUDA: at the medium preset's shape on an H200, forward + backward take 0.76 ms against 1.22 ms for
# flash, which scaled_dot_product_attention picks (benchmarks/attention.py). The aten op is called
# by name: with sdpa_kernel's backend priority set, the compiled training step still ran flash
# (unchanged 90.0 ms). Shapes cuDNN does not take (head dims that differ or exceed 128, fp32, one
# token: "s_q = s_kv = 1 is not supported") and the CPU keep sdpa's choice.
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    Dh = q.shape[-1]
    if (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-1] == Dh
            and v.shape[-1] == Dh and Dh % 8 == 0 and Dh <= 128 and q.shape[-2] > 1):
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, grad, 0.0, True, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE (and optional qk-norm and qkv biases)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.dim, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, G * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, G * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, cfg.dim, bias=False)
        # qk-norm over each head (Qwen3) or over the whole q / k projection (OLMoE)
        per_head = cfg.qk_norm_scope == "head"
        self.q_norm = RMSNorm(Dh if per_head else H * Dh, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh if per_head else G * Dh, cfg.norm_eps) if cfg.qk_norm else None

    def new_cache(self, batch_size, max_len, device, dtype):
        shape = (batch_size, self.cfg.num_kv_heads, max_len, self.cfg.head_size)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in ("k", "v"))

    def forward(self, x_BTD, positions_BT, layer_cache=None, rope=None):
        """`rope`: (cos, sin) of rope_tables(head_size, positions_BT), when the caller has them
        (a decode step computes them once for every layer)."""
        B, T, _ = x_BTD.shape
        H, G, Dh = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_size
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.q_norm is not None and self.cfg.qk_norm_scope == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, T, -1, Dh).transpose(1, 2) for t in (q, k, v))   # [B, H or G, T, Dh]
        if self.q_norm is not None and self.cfg.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope if rope is not None else rope_tables(Dh, positions_BT, self.cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is None:
            out = causal_attention(q, k, v, enable_gqa=G != H)
        else:
            k_cache, v_cache = layer_cache
            rows = torch.arange(B, device=x_BTD.device).unsqueeze(-1)
            k_cache[rows, :, positions_BT] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, positions_BT] = v.transpose(1, 2).to(v_cache.dtype)
            # grouped queries as extra query rows of their kv head ([B, G, (H/G) T, Dh]): plain
            # attention over the cache as stored, never expanded to H heads (a copy per step)
            mask = causal_mask(positions_BT, k_cache.shape[2]).unsqueeze(2)   # [B, 1, 1, T, S]
            mask = mask.expand(B, 1, H // G, T, -1).reshape(B, 1, H // G * T, -1)
            out = F.scaled_dot_product_attention(q.reshape(B, G, H // G * T, Dh),
                                                 k_cache.to(q.dtype), v_cache.to(q.dtype),
                                                 attn_mask=mask).reshape(B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Dh))


def make_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        from dropless.mla import MLAttention
        return MLAttention(cfg)
    return Attention(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.first_dense_layers
        self.ffn = MoE(cfg.moe) if self.is_moe else SwiGLU(cfg.dim, cfg.dense_hidden)

    def forward(self, x_BTD, positions_BT, layer_cache=None, rope=None):
        """`rope`: rope_tables(cfg.rope_dim, positions_BT), shared by every layer of a forward."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, layer_cache=layer_cache,
                                  rope=rope)
        h = self.ffn_norm(x_BTD)
        if self.is_moe:
            out, aux = self.ffn(h)
            return x_BTD + out, aux
        return x_BTD + self.ffn(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._set_rope_tables(None)
        self.reset_parameters()

    def _set_rope_tables(self, device) -> None:
        """RoPE cos/sin of the first positions (max_seq_len, or as many as the bounds above
        allow; later ones are computed per forward) as fp32 buffers, not saved. Computed per
        forward instead, torch.compile inlines the cos/sin into every layer's norm+RoPE kernels,
        forward and backward (round 8's profile of the one-graph step: ~15 ms of a 101 ms step);
        a buffer is a graph input, read, not recomputed."""
        n = min(self.cfg.max_seq_len, ROPE_TABLE_MAX, ROPE_TABLE_NUMEL // self.cfg.rope_dim)
        cos, sin = rope_tables(self.cfg.rope_dim, torch.arange(n, device=device), self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the tables, and a model built on the meta device has none to
        # copy: they are rebuilt, fp32, on the device the weights went to
        del self._buffers["rope_cos"], self._buffers["rope_sin"]
        super()._apply(fn, recurse)
        self._set_rope_tables(self.embed.weight.device)
        return self

    @torch.no_grad()
    def reset_parameters(self):
        # a tied embedding is also the LM head: scale it so initial logits have unit variance
        nn.init.normal_(self.embed.weight, std=self.cfg.dim ** -0.5 if self.cfg.tie_embeddings else 1.0)
        for layer in self.layers:
            for lin in layer.attn.modules():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
                    if lin.bias is not None:
                        lin.bias.zero_()
            if not layer.is_moe:   # a dense FFN starts like an expert (SwiGLU's own init)
                layer.ffn.reset_parameters()
            # residual projections start small so deep stacks train stably
            layer.attn.o_proj.weight.mul_((2 * self.cfg.num_layers) ** -0.5)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.cfg.dim ** -0.5)

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def set_backend(self, backend: str) -> None:
        """Override the MoE expert backend ("auto", "reference", "grouped", ...) of every layer
        for this model object (calibration forces the unfused path); `MoEConfig.backend`, which
        checkpoints save, stays the backend the model was built with."""
        for moe in self.moe_layers():
            moe.experts.backend = backend

    def update_bias(self, loads_LE: torch.Tensor) -> None:
        """Aux-loss-free bias step for every MoE layer (no-op where bias balancing is off)."""
        for moe, load_E in zip(self.moe_layers(), loads_LE):
            if moe.router.bias is not None:
                moe.update_bias(load_E)

    def check_tokens(self, tokens_BT: torch.Tensor, cache: KVCache | None = None) -> None:
        """ValueError for token ids that are not integers in [0, vocab_size) and for sequences past
        max_seq_len (or the cache's length), before they reach the embedding or the cache.

        Shapes are checked always (host values, free). The id range needs the values: on the CPU a
        pass over B*T integers, on an accelerator a device-to-host sync that in the training loop
        would stall the kernel queue every micro-batch. So there it runs only in eval mode, where
        ids come from users (generation already syncs every step); training ids come from
        dropless's own tokenizer and token cache. Under torch.compile it would break the graph."""
        V, L = self.cfg.vocab_size, self.cfg.max_seq_len
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens.shape={tuple(tokens_BT.shape)} is invalid: expected [batch, seq]")
        if tokens_BT.dtype not in (torch.int64, torch.int32):   # what nn.Embedding takes
            raise ValueError(f"tokens.dtype={tokens_BT.dtype} is invalid: token ids must be int64 "
                             "or int32")
        T = tokens_BT.shape[1]
        if T > (L if cache is None else cache.max_len):
            raise ValueError(f"sequence length {T} is invalid: at most max_seq_len={L}"
                             + ("" if cache is None else f" (KV cache length {cache.max_len})"))
        check_ids = (tokens_BT.numel() > 0 and (tokens_BT.device.type == "cpu" or not self.training)
                     and not torch.compiler.is_compiling())
        checks = list(torch.aminmax(tokens_BT)) if check_ids else []
        if cache is not None:   # the cache's fill is a tensor: fetched with the ids, one sync
            checks.append(cache.lengths_B.max() + T)
        if not checks:
            return
        values = torch.stack([c.to(torch.long) for c in checks]).tolist()   # sync: bounds checks
        if cache is not None and values[-1] > cache.max_len:
            raise ValueError(f"KV cache of length {cache.max_len} is full: {T} more tokens would "
                             f"fill it to {values[-1]}")
        if check_ids and (values[0] < 0 or values[1] >= V):
            bad = values[0] if values[0] < 0 else values[1]
            raise ValueError(f"token id {bad} is invalid: ids must be in [0, {V - 1}] "
                             f"(vocab_size={V})")

    def forward(self, tokens_BT: torch.Tensor, cache: KVCache | None = None):
        self.check_tokens(tokens_BT, cache)
        B, T = tokens_BT.shape
        if cache is None:
            positions_BT = torch.arange(T, device=tokens_BT.device).expand(B, T)
        else:
            positions_BT = cache.lengths_B.unsqueeze(-1) + torch.arange(T, device=tokens_BT.device)
        # once per forward, shared by every layer; without a cache every row has the same
        # positions, so one row's table serves
        if cache is None and T <= self.rope_cos.shape[0]:
            rope = self.rope_cos[:T].unsqueeze(0), self.rope_sin[:T].unsqueeze(0)
        else:
            rope = rope_tables(self.cfg.rope_dim, positions_BT[:1] if cache is None else
                               positions_BT, self.cfg.rope_theta)
        x = self.embed(tokens_BT)
        balance, z, loads = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32), []
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, positions_BT, None if cache is None else cache.layers[i], rope)
            if aux is not None:
                balance, z = balance + aux.balance_loss, z + aux.z_loss
                loads.append(aux.tokens_per_expert)
        if cache is not None:
            cache.lengths_B += T
        logits = self.lm_head(self.norm(x))
        E = self.cfg.moe.num_experts
        loads_LE = torch.stack(loads) if loads else torch.zeros(0, E, dtype=torch.long, device=x.device)
        return logits, ModelAux(balance, z, loads_LE)
