"""Modules that keep int4 weights packed in memory: QuantizedLinear (attention projections) and
QuantizedExperts (a drop-in for `dropless.experts.Experts`), plus `quantize_modules`, which swaps
them into a model so that a quantized state_dict loads.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows.
Weights are stored as x @ W (W [in, out]) in the GEMM layout of `pack.py`; every forward goes
through `dropless.ops.awq`, which picks the Triton kernels on a GPU and dequantize-then-matmul
elsewhere. Inference only: there are no gradients for packed weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dropless.ops import awq as awq_ops
from dropless.quant.pack import GROUP_SIZES, PACK, check_shape, dequantize, quantize_packed


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What `dropless quantize` did; saved in the quantized run's checkpoint."""

    bits: int = 4
    group_size: int = 128
    attention: bool = True     # the attention projections are QuantizedLinear (GQA only)
    experts: bool = True       # the routed experts are QuantizedExperts

    def __post_init__(self):
        # a run's state.json comes from strangers: 32.0 is `in GROUP_SIZES` but no buffer shape
        # (a TypeError traceback at load), and "false" would read as true
        if type(self.bits) is not int or self.bits != 4:
            raise ValueError(f"bits={self.bits!r} is invalid: only 4-bit weights are implemented")
        if type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is invalid: allowed: {GROUP_SIZES}")
        for name, value in (("attention", self.attention), ("experts", self.experts)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: must be true or false")


class Int4Weight(nn.Module):
    """One (or E stacked) packed [in, out] matrices: buffers qweight, qzeros, scales."""

    def __init__(self, lead: tuple[int, ...], in_features: int, out_features: int, group_size: int,
                 device=None):
        super().__init__()
        check_shape(in_features, out_features, group_size)
        G, P = in_features // group_size, out_features // PACK
        self.register_buffer("qweight", torch.zeros(*lead, in_features, P, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(*lead, G, P, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(*lead, G, out_features, dtype=torch.float16,
                                                   device=device))

    @property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qweight, self.qzeros, self.scales

    def _apply(self, fn, recurse=True):
        # the scales never go to bf16 with a model (load_model_dir(dtype=bf16), .to(bf16)): every
        # scale is an fp16 value, which bf16 rounds by up to 2^-9 (3 mantissa bits fewer); a cast
        # to float32 is exact and allowed
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype == torch.bfloat16 and scales.dtype != torch.bfloat16:
            self.scales = scales.to(self.scales.device)
        return self

    @torch.no_grad()
    def set_from(self, w: torch.Tensor, max_abs: torch.Tensor | None = None,
                 index: int | None = None) -> None:
        """Quantize w [..., in, out] (round to nearest, optionally clipped) into the buffers, or
        into matrix `index` of a stack (w [in, out])."""
        group_size = w.shape[-2] // self.qzeros.shape[-2]
        for buf, t in zip(self.packed, quantize_packed(w, group_size, max_abs)):
            (buf if index is None else buf[index]).copy_(t)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(*self.packed, dtype=dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed)


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W) + bias, in place of nn.Linear(in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Int4Weight((), in_features, out_features, group_size, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int,
                    max_abs: torch.Tensor | None = None) -> "QuantizedLinear":
        q = cls(lin.in_features, lin.out_features, group_size, lin.bias is not None,
                lin.weight.device)
        q.weight.set_from(lin.weight.detach().T, max_abs)
        if lin.bias is not None:
            q.bias.data = lin.bias.detach().clone()
        return q

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) x @ dequant(W) + bias; the residual is added in the kernels' last launch
        (an inference engine's decode step: one kernel less)."""
        if residual is not None and self.bias is None and \
                residual.shape == (*x.shape[:-1], self.out_features):
            y = awq_ops.awq_linear(x.reshape(-1, self.in_features), *self.weight.packed,
                                   residual.reshape(-1, self.out_features))
            return y.view(residual.shape)
        y = awq_ops.awq_linear(x.reshape(-1, self.in_features), *self.weight.packed)
        y = y.view(*x.shape[:-1], self.out_features)
        y = y if self.bias is None else y + self.bias.to(y.dtype)
        return y if residual is None else residual + y


class QuantizedExperts(nn.Module):
    """E int4 SwiGLU experts: gate_up [E, D, 2F] (gate = first half), down [E, F, D], packed.

    Same calls as `Experts`: forward over expert-contiguous rows, and the fused path the MoE layer
    takes on a GPU (gathers token rows itself: the decode kernel for a few tokens, the grouped
    kernel otherwise). `decode` is the small-T entry point for an inference engine."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, group_size: int, device=None):
        super().__init__()
        self.backend = "auto"   # set_backend writes it; the int4 path has one implementation
        self.gate_up = Int4Weight((num_experts,), dim, 2 * hidden_dim, group_size, device)
        self.down = Int4Weight((num_experts,), hidden_dim, dim, group_size, device)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return awq_ops.awq_experts(x_RD, counts_E, *self.gate_up.packed, *self.down.packed)

    def fuses_dispatch(self, x_TD: torch.Tensor) -> bool:
        return awq_ops.kernels_run(x_TD)

    def fused(self, x_TD: torch.Tensor, plan, weights_TK: torch.Tensor) -> torch.Tensor:
        return awq_ops.awq_fused_experts(x_TD, plan, weights_TK, *self.gate_up.packed,
                                         *self.down.packed)

    def decodes(self, x_TD: torch.Tensor, top_k: int) -> bool:
        """Whether the MoE layer should call `decode` (no plan, no sort) for these tokens: the
        kernels run here and experts see about one row each."""
        return awq_ops.kernels_run(x_TD) and awq_ops.decode_pays(x_TD.shape[0] * top_k,
                                                                 self.down.qweight.shape[0])

    def decode(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
               residual_TD: torch.Tensor | None = None) -> torch.Tensor:
        """y_TD = (residual[t] +) sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), straight from
        the routing (no plan, no sort): one program per (slot, column tile) reads its expert's
        packed weights; the residual is added in the last kernel."""
        return awq_ops.awq_moe_decode(x_TD, expert_ids_TK, weights_TK, *self.gate_up.packed,
                                      *self.down.packed, residual_TD=residual_TD)

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantize_modules(model, qcfg: QuantConfig) -> None:
    """Swap empty quantized modules into `model` in place (shapes from its config), so that a
    quantized state_dict loads with load_state_dict(..., assign=True)."""
    cfg = model.cfg
    device = model.embed.weight.device
    for layer in model.layers:
        if qcfg.attention and cfg.attention == "gqa":
            for name in ATTENTION_PROJECTIONS:
                lin = getattr(layer.attn, name)
                setattr(layer.attn, name, QuantizedLinear(
                    lin.in_features, lin.out_features, qcfg.group_size, lin.bias is not None,
                    device))
        if layer.is_moe and qcfg.experts:
            m = cfg.moe
            layer.ffn.experts = QuantizedExperts(m.num_experts, m.dim, m.hidden_dim,
                                                 qcfg.group_size, device)


@torch.no_grad()
def quantize_rtn(model, qcfg: QuantConfig):
    """Round every weight AWQ would quantize to nearest, in place (no calibration, no scale or
    clip search): seconds instead of minutes, for benchmarks of the int4 kernels on a whole model,
    whose speed does not depend on the values. Expert by expert (bounded float32 temporaries).
    Returns the model."""
    check_quantizable(model.cfg, qcfg)
    gs = qcfg.group_size
    for layer in model.layers:
        if qcfg.attention and model.cfg.attention == "gqa":
            for name in ATTENTION_PROJECTIONS:
                setattr(layer.attn, name, QuantizedLinear.from_linear(getattr(layer.attn, name), gs))
        if layer.is_moe and qcfg.experts:
            old = layer.ffn.experts
            q = QuantizedExperts(old.down.shape[0], old.gate_up.shape[1], old.down.shape[1], gs,
                                 device=old.down.device)
            for new, w in ((q.gate_up, old.gate_up), (q.down, old.down)):
                for e in range(w.shape[0]):
                    new.set_from(w[e], index=e)
            layer.ffn.experts = q
    return model


def check_quantizable(cfg, qcfg: QuantConfig) -> None:
    """Something is quantized, and every quantized matrix the model has splits into whole groups
    and whole int32 columns (a model without MoE layers builds no experts: cfg.moe's shapes are
    not its own)."""
    num_moe = cfg.num_layers - cfg.first_dense_layers
    experts, attention = qcfg.experts and num_moe > 0, qcfg.attention and cfg.attention == "gqa"
    if not (experts or attention):
        raise ValueError(f"nothing to quantize: int4 holds the routed experts and GQA attention "
                         f"projections; this model has {num_moe or 'no'} MoE layer"
                         f"{'' if num_moe == 1 else 's'} and {cfg.attention} attention (quant: "
                         f"experts={qcfg.experts}, attention={qcfg.attention})")
    m = cfg.moe
    if experts:
        check_shape(m.dim, 2 * m.hidden_dim, qcfg.group_size, "experts.gate_up")
        check_shape(m.hidden_dim, m.dim, qcfg.group_size, "experts.down")
    if attention:
        H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        check_shape(cfg.dim, G * Dh, qcfg.group_size, "attn.k_proj")
        check_shape(cfg.dim, H * Dh, qcfg.group_size, "attn.q_proj")
        check_shape(H * Dh, cfg.dim, qcfg.group_size, "attn.o_proj")
