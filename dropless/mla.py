"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one low-rank latent per
token, plus a single RoPE key shared by all heads.

Legend: B batch, T new tokens, S cached positions, H heads, D model dim, C kv latent rank
(kv_lora_rank), N no-rope q/k head dim, P rope head dim, Dv value head dim.

Training and full recomputation expand the latent into per-head keys and values (kv_b_proj). The
inference cache stores only the normalised latent [B, S, C] and the roped key [B, S, P], and attends
in the absorbed form: kv_b's key half is folded into the query (q_nope @ W_uk gives a query in latent
space) and its value half into the output (the attention-weighted latent @ W_uv^T), so no per-head
key or value is ever materialised for cached positions. Both forms compute the same scores:
q_nope . (W_uk c) = (W_uk^T q_nope) . c.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.config import ModelConfig
from dropless.model import RMSNorm, apply_rope, causal_attention, causal_mask, rope_tables

# DeepSeek normalises both latents with eps 1e-6 whatever the model's norm_eps is.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.attention == "mla"
        self.cfg = cfg
        H, D, C = cfg.num_heads, cfg.dim, cfg.kv_lora_rank
        N, P, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (N + P), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * (N + P), bias=False)
        # one projection gives the kv latent (first C) and the shared rope key (last P)
        self.kv_a_proj = nn.Linear(D, C + P, bias=cfg.attention_bias)
        self.kv_a_norm = RMSNorm(C, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(C, H * (N + Dv), bias=False)
        self.o_proj = nn.Linear(H * Dv, D, bias=cfg.attention_bias)
        self.scale = (N + P) ** -0.5

    def new_cache(self, batch_size, max_len, device, dtype):
        """(latent [B, S, C], rope key [B, S, P]): the whole per-layer inference state."""
        cfg = self.cfg
        return (torch.zeros(batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
                torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype))

    def _query(self, x_BTD):
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x_BTD)
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))

    def forward(self, x_BTD, positions_BT, layer_cache=None, rope=None):
        """`rope`: (cos, sin) of rope_tables(qk_rope_head_dim, positions_BT), if precomputed."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        H, C = cfg.num_heads, cfg.kv_lora_rank
        N, P, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        # 1. queries per head, split into the no-rope and rope parts
        q = self._query(x_BTD).view(B, T, H, N + P).transpose(1, 2)
        q_nope, q_rope = q.split([N, P], dim=-1)
        # 2. the latent (normalised) and the shared rope key
        latent_BTC, k_rope_BTP = self.kv_a_proj(x_BTD).split([C, P], dim=-1)
        latent_BTC = self.kv_a_norm(latent_BTC)
        cos, sin = rope if rope is not None else rope_tables(P, positions_BT, cfg.rope_theta)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope_BTP.unsqueeze(1), cos, sin)          # [B, 1, T, P]
        w_kv = self.kv_b_proj.weight.view(H, N + Dv, C)
        if layer_cache is None:
            # 3a. expanded form: per-head keys and values from the latent
            kv = F.linear(latent_BTC, self.kv_b_proj.weight).view(B, T, H, N + Dv).transpose(1, 2)
            k_nope, v = kv.split([N, Dv], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(B, H, T, P)], dim=-1)
            out = causal_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, scale=self.scale)
        else:
            # 3b. absorbed form over the compressed cache: one shared "head" of width C + P
            latent_cache, rope_cache = layer_cache
            rows = torch.arange(B, device=x_BTD.device).unsqueeze(-1)
            latent_cache[rows, positions_BT] = latent_BTC.to(latent_cache.dtype)
            rope_cache[rows, positions_BT] = k_rope.squeeze(1).to(rope_cache.dtype)
            w_uk, w_uv = w_kv.split([N, Dv], dim=1)                      # [H, N, C], [H, Dv, C]
            q_latent = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)
            query = torch.cat([q_latent, q_rope], dim=-1)                # [B, H, T, C + P]
            latent = latent_cache.to(q.dtype).unsqueeze(1)               # [B, 1, S, C]
            key = torch.cat([latent, rope_cache.to(q.dtype).unsqueeze(1)], dim=-1)
            mask = causal_mask(positions_BT, latent_cache.shape[1])
            out_latent = F.scaled_dot_product_attention(query, key, latent, attn_mask=mask,
                                                        scale=self.scale, enable_gqa=True)
            out = torch.einsum("bhtc,hvc->bhtv", out_latent, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Dv))
