"""`dropless quantize`: AWQ over a whole model, layer by layer, and the quantized run directory.

Legend: N calibration rows (samples x seq_len), D model dim, F expert hidden, E experts.

Per transformer layer:
  1. Capture: run the (float) layer on the calibration activations with hooks that record the
     input of q|k|v (attention norm output), of o_proj, of the MoE layer (ffn norm output) and the
     rows the dispatcher sends to each expert (the experts' forward inputs). Its output feeds the
     next layer.
  2. Scales (search_scale), each folded into the op before, so the float model is unchanged:
       q|k|v  <- attn_norm.weight          (one scale, three projections)
       o_proj <- v_proj rows               (tied across the query heads that share a kv head)
       every expert's gate|up <- ffn_norm.weight, compensated in the router, shared experts and
                 shared gate (which read the same input and stay unquantized); the loss is each
                 expert's error on the rows routed to it
       expert e's down <- expert e's up columns (per expert)
  3. Clip search per weight (not q and k: attention logits are sensitive), then round to nearest
     into packed modules. An expert with no calibration rows is rounded to nearest with a warning.
Router, embeddings, norms, dense and shared feed-forwards and the LM head stay in float.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from dropless.quant.awq import act_stat, search_clip, search_scale
from dropless.quant.modules import (QuantConfig, QuantizedExperts, QuantizedLinear,
                                    check_quantizable)

CAPTURE_BATCH = 8   # calibration samples per forward of one layer


class _Capture:
    """Forward hooks on one block recording what its linears see."""

    def __init__(self, layer):
        self.qkv, self.o, self.ffn = [], [], []
        self.expert_rows = None
        attn = layer.attn
        self.handles = [
            layer.attn_norm.register_forward_hook(lambda m, a, out: self.qkv.append(out.flatten(0, -2))),
            attn.o_proj.register_forward_pre_hook(lambda m, a: self.o.append(a[0].flatten(0, -2))),
        ]
        if layer.is_moe:
            self.handles += [
                layer.ffn_norm.register_forward_hook(lambda m, a, out: self.ffn.append(out.flatten(0, -2))),
                layer.ffn.experts.register_forward_pre_hook(self._experts),
            ]

    def _experts(self, module, args):
        x_RD, counts_E = args
        parts = x_RD.split(counts_E.tolist())   # sync: split sizes (calibration only)
        if self.expert_rows is None:
            self.expert_rows = [[] for _ in parts]
        for rows, part in zip(self.expert_rows, parts):
            rows.append(part)

    def remove(self):
        for h in self.handles:
            h.remove()


def _scale_columns(lin: nn.Linear, s: torch.Tensor) -> None:
    lin.weight.mul_(s[None, :].to(lin.weight.dtype))


@torch.no_grad()
def _attention(layer, cap: _Capture, gs: int, name: str):
    attn = layer.attn
    cfg = attn.cfg
    x = torch.cat(cap.qkv).float()
    # q|k|v share one scale: the norm's output feeds all three
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T
    s, _, _ = search_scale(act_stat(x), [(x, w)], gs)
    layer.attn_norm.weight.div_(s.to(layer.attn_norm.weight.dtype))
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        _scale_columns(lin, s)
    x = x / s
    # o_proj: input channel (h, d) is v channel (h // (H/G), d); tie the scale across a kv group
    H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    xo = torch.cat(cap.o).float()
    stat = act_stat(xo).view(G, H // G, Dh).mean(1, keepdim=True).expand(G, H // G, Dh)
    so, _, _ = search_scale(stat.reshape(-1), [(xo, attn.o_proj.weight.T)], gs)
    sv = so.view(G, H // G, Dh)[:, 0].reshape(-1)
    _scale_columns(attn.o_proj, so)
    attn.v_proj.weight.div_(sv[:, None].to(attn.v_proj.weight.dtype))
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.div_(sv.to(attn.v_proj.bias.dtype))
    xo = xo / so
    # clip (not q and k), round, pack
    clips = {"v_proj": search_clip(x, attn.v_proj.weight.T, gs),
             "o_proj": search_clip(xo, attn.o_proj.weight.T, gs)}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(attn, proj, QuantizedLinear.from_linear(getattr(attn, proj), gs, clips.get(proj)))


@torch.no_grad()
def _experts(layer, cap: _Capture, gs: int, name: str):
    moe = layer.ffn
    experts = moe.experts
    gate_up, down = experts.gate_up.data, experts.down.data   # [E, D, 2F], [E, F, D]
    E, F_ = down.shape[0], down.shape[1]
    rows = [torch.cat(r).float() for r in cap.expert_rows]
    # 1. one gate|up scale for every expert (their input is the norm's output), judged on the
    #    rows each expert actually receives; folded into the norm, compensated where else it is read
    x = torch.cat(cap.ffn)
    s, _, _ = search_scale(act_stat(x), [(r, gate_up[e]) for e, r in enumerate(rows)], gs)
    moe_norm = layer.ffn_norm.weight
    moe_norm.div_(s.to(moe_norm.dtype))
    gate_up.mul_(s[None, :, None].to(gate_up.dtype))
    _scale_columns(moe.router, s)
    for lin in ([moe.shared.gate_proj, moe.shared.up_proj] if moe.shared is not None else []):
        _scale_columns(lin, s)
    if moe.shared_gate is not None:
        _scale_columns(moe.shared_gate, s)
    rows = [r / s for r in rows]
    # 2. per expert: down's scale folded into the up columns, then clip searches
    clip_gu, clip_dn = [], []
    for e in range(E):
        if rows[e].shape[0] == 0:
            warnings.warn(f"{name}.ffn.experts[{e}] received no calibration tokens: its weights "
                          "are rounded to nearest (no scale or clip search)", stacklevel=1)
            clip_gu.append(None)
            clip_dn.append(None)
            continue
        g, u = (rows[e] @ gate_up[e].float()).chunk(2, dim=-1)
        h = F.silu(g) * u
        sd, _, _ = search_scale(act_stat(h), [(h, down[e])], gs)
        down[e].mul_(sd[:, None].to(down.dtype))
        gate_up[e, :, F_:].div_(sd[None, :].to(gate_up.dtype))
        clip_gu.append(search_clip(rows[e], gate_up[e], gs))
        clip_dn.append(search_clip(h / sd, down[e], gs))
    q = QuantizedExperts(E, gate_up.shape[1], F_, gs, device=gate_up.device)
    q.backend = experts.backend
    for e in range(E):
        q.gate_up.set_from(gate_up[e], clip_gu[e], index=e)
        q.down.set_from(down[e], clip_dn[e], index=e)
    moe.experts = q


@torch.no_grad()
def quantize_model(model, tokens_NS: torch.Tensor, qcfg: QuantConfig, progress: bool = True):
    """AWQ-quantize `model` in place on the calibration token windows tokens_NS [N, S]; returns it.
    The model runs in its own dtype and device; the searches run in float32."""
    from tqdm.auto import tqdm

    cfg = model.cfg
    check_quantizable(cfg, qcfg)
    model.eval()
    model.set_backend("grouped")   # the experts' forward (and its capture hook) must run unfused
    device = model.embed.weight.device
    tokens_NS = tokens_NS.to(device)
    positions = torch.arange(tokens_NS.shape[1], device=device)
    xs = [model.embed(t) for t in tokens_NS.split(CAPTURE_BATCH)]
    quant_attention = qcfg.attention and cfg.attention == "gqa"
    for i, layer in enumerate(tqdm(model.layers, desc="quantize", unit="layer",
                                   disable=not progress)):
        cap = _Capture(layer)
        try:
            xs = [layer(x, positions.expand(x.shape[0], -1))[0] for x in xs]
        finally:
            cap.remove()
        if quant_attention:
            _attention(layer, cap, qcfg.group_size, f"layers.{i}")
        if layer.is_moe:
            _experts(layer, cap, qcfg.group_size, f"layers.{i}")
        del cap
    return model
