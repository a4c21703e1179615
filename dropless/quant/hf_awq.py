"""AutoAWQ "GEMM" checkpoints in Hugging Face directories, read by `from_hf` and written by `to_hf`.

config.json carries quantization_config {"quant_method": "awq", "bits": 4, "group_size": g,
"zero_point": true, "version": "gemm", "modules_to_not_convert": [...]}; a quantized linear
`<name>.weight` is replaced by `<name>.qweight` int32 [in, out/8], `<name>.qzeros` int32
[in/g, out/8] and `<name>.scales` fp16 [in/g, out] (pack.py's layout, the transpose of the HF
weight), in each architecture's per-expert layout (Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`,
the others `mlp.experts.{e}.gate_proj/up_proj/down_proj`).

Reading keeps the experts and the attention projections packed (QuantizedExperts, QuantizedLinear)
when every one of them is quantized in the file; any other quantized linear (shared experts, dense
layers, MLA projections, a partly quantized group) is dequantized into dropless's float module.
"""

from __future__ import annotations

import torch

from dropless.hf import expert_cols
from dropless.quant.pack import GROUP_SIZES, PACK, dequantize

PARTS = ("qweight", "qzeros", "scales")
EXPERT_KINDS = ("gate", "up", "down")
ATTENTION = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight")


def awq_settings(hf_cfg: dict) -> tuple[int, int]:
    """(bits, group_size) of an AutoAWQ GEMM config; any other quantization is refused by name."""
    q = hf_cfg["quantization_config"]
    if not isinstance(q, dict):
        raise ValueError(f"quantization_config={q!r} is invalid: must be an object")
    method = q.get("quant_method")
    if method != "awq":
        raise ValueError(f"unsupported Hugging Face config: quantization_config.quant_method="
                         f"{method!r} (only AutoAWQ 'awq' checkpoints are read)")
    for field, want in (("bits", 4), ("zero_point", True)):
        if q.get(field, want) != want:
            raise ValueError(f"unsupported Hugging Face config: quantization_config.{field}="
                             f"{q.get(field)!r} (must be {want!r})")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"unsupported Hugging Face config: quantization_config.version="
                         f"{q.get('version')!r} (only the 'gemm' packing is read)")
    group = q.get("group_size", 128)
    if group not in GROUP_SIZES:   # 0 would divide by zero below
        raise ValueError(f"unsupported Hugging Face config: quantization_config.group_size="
                         f"{group!r} (allowed: {', '.join(map(str, GROUP_SIZES))})")
    return 4, int(group)


def _is_attention(row, cfg) -> bool:
    return cfg.attention == "gqa" and row.key.endswith(ATTENTION)


class AwqFile:
    """The quantized tensors of one checkpoint, as from_hf needs them."""

    def __init__(self, hf_cfg: dict, cfg, where: dict, file_key: dict, rows):
        from dropless.quant.modules import QuantConfig

        _, group = awq_settings(hf_cfg)
        self.cfg, self.file_key, self.handles = cfg, file_key, {}
        prefixes = sorted(k[:-len(".qweight")] for k in where if k.endswith(".qweight"))
        self.where = dict(where)   # each quantized linear appears as `.weight` [out, in]
        self.files = {}
        for p in prefixes:
            missing = [f"{p}.{part}" for part in PARTS if f"{p}.{part}" not in where]
            if missing:
                raise ValueError(f"{where[f'{p}.qweight'][0]}: AWQ tensors missing: "
                                 f"{', '.join(missing)}")
            (fq, qs, dq), (_, zs, dz), (_, ss, ds) = (where[f"{p}.{part}"] for part in PARTS)
            if f"{p}.weight" in where:   # the packed tensors replace it below: which one is meant?
                raise ValueError(f"{where[f'{p}.weight'][0]}: {p} is stored twice, as {p}.weight "
                                 "and as AWQ qweight/qzeros/scales")
            I, P = qs if len(qs) == 2 else (0, 0)   # a qweight of another rank fits no group
            if zs != (I // group, P) or ss != (I // group, P * PACK) or I % group:
                raise ValueError(f"{fq}: {p}: AWQ shapes qweight {list(qs)}, qzeros {list(zs)}, "
                                 f"scales {list(ss)} do not fit group_size={group}")
            if (dq, dz) != ("I32", "I32") or ds not in ("F16", "BF16", "F32"):
                raise ValueError(f"{fq}: {p} AWQ dtypes qweight {dq}, qzeros {dz}, scales "
                                 f"{ds} (allowed: I32, I32, F16/BF16/F32)")
            for part in PARTS:
                self.files[f"{p}.{part}"] = where[f"{p}.{part}"][0]
                del self.where[f"{p}.{part}"]
            self.where[f"{p}.weight"] = (fq, (P * PACK, I), ds)   # dequantizes to scales' dtype
        self.quantized = {f"{p}.weight" for p in prefixes}
        experts = [r for r in rows if r.kind in EXPERT_KINDS]
        attention = [r for r in rows if _is_attention(r, cfg)]
        self.packed_experts = bool(experts) and all(r.hf_key in self.quantized for r in experts)
        self.packed_attention = bool(attention) and all(r.hf_key in self.quantized
                                                        for r in attention)
        self.qcfg = QuantConfig(group_size=group, attention=self.packed_attention,
                                experts=self.packed_experts)

    def _read(self, hf_key: str):
        from safetensors import safe_open

        prefix = hf_key[:-len(".weight")]
        out = []
        for part in PARTS:
            name = f"{prefix}.{part}"
            f = self.files[name]
            try:
                if f not in self.handles:
                    self.handles[f] = safe_open(f, "pt", device="cpu")
                out.append(self.handles[f].get_tensor(self.file_key[name]))
            except Exception as err:
                raise ValueError(f"{f}: cannot read {name} (truncated or corrupt file?): "
                                 f"{err}") from err
        return out

    def _check_scales(self, hf_key: str, scales: torch.Tensor, packed: bool) -> None:
        """A NaN or inf scale makes its whole group NaN; a scale kept packed must also fit the
        fp16 of Int4Weight's buffers (a run directory loads into them): an F32 or BF16 one past
        65504 would silently become inf there, a tiny one 0."""
        name = f"{hf_key[:-len('.weight')]}.scales"
        held = scales.to(torch.float16) if packed else scales
        bad = ~torch.isfinite(held) | ((held == 0) & (scales != 0))
        if bad.any():   # sync: one check per tensor
            where = tuple(i.item() for i in bad.nonzero()[0])
            what = ("is not finite" if not torch.isfinite(scales[where]) else "is outside "
                    "fp16, which packed int4 weights keep their scales in (6e-8 to 65504)")
            raise ValueError(f"{self.files[name]}: {name}{list(where)} = "
                             f"{scales[where].item():g} {what}")

    def keeps_packed(self, row) -> bool:
        if row.hf_key not in self.quantized:
            return False
        return ((row.kind in EXPERT_KINDS and self.packed_experts)
                or (_is_attention(row, self.cfg) and self.packed_attention))

    def fill_packed(self, state: dict, row) -> None:
        """The three packed tensors into the quantized module's buffers, unchanged."""
        packed = self._read(row.hf_key)
        self._check_scales(row.hf_key, packed[2], packed=True)
        # Int4Weight's scales are fp16 (a run directory loads them into fp16): an F32 or BF16
        # file's kept as they are made from_hf's model compute other logits than its converted run
        packed[2] = packed[2].to(torch.float16)
        if row.kind not in EXPERT_KINDS:
            for part, t in zip(PARTS, packed):
                state[f"{row.key}.{part}"] = t
            return
        m = self.cfg.moe
        E, D, F = m.num_experts, m.dim, m.hidden_dim
        for part, t in zip(PARTS, packed):
            key = f"{row.key}.{part}"
            if key not in state:   # gate|up share one stack: gate the first F columns, up the rest
                in_f, out_f = (F, D) if row.kind == "down" else (D, 2 * F)
                G = in_f // self.qcfg.group_size
                shape = {"qweight": (E, in_f, out_f // PACK), "qzeros": (E, G, out_f // PACK),
                         "scales": (E, G, out_f)}[part]
                state[key] = torch.zeros(shape, dtype=t.dtype)
            state[key][row.expert, :, expert_cols(row.kind, t.shape[-1])] = t

    def dequantized(self, row) -> torch.Tensor | None:
        """A quantized linear that dropless holds in float: its weight [out, in]; else None."""
        if row.hf_key not in self.quantized:
            return None
        packed = self._read(row.hf_key)
        self._check_scales(row.hf_key, packed[2], packed=False)
        return dequantize(*packed).T.contiguous()


# ---- writing ---------------------------------------------------------------------------------------

def is_quantized(model) -> bool:
    return any(name.endswith(".qweight") for name, _ in model.named_buffers())


def packed_tensors(state: dict, row, cfg) -> dict[str, torch.Tensor] | None:
    """HF tensors of one layout row held packed in `state` (None when it is a float row)."""
    if f"{row.key}.qweight" not in state:
        return None
    prefix = row.hf_key[:-len(".weight")]
    out = {}
    for part in PARTS:
        t = state[f"{row.key}.{part}"]
        if row.kind in EXPERT_KINDS:
            t = t[row.expert, :, expert_cols(row.kind, t.shape[-1] // 2)]
        out[f"{prefix}.{part}"] = t.clone(memory_format=torch.contiguous_format)
    return out


def quantization_config(model, model_type: str) -> dict:
    """AutoAWQ's config block; modules_to_not_convert names (by substring, as AutoAWQ and
    transformers match them) every linear this model keeps in float."""
    from dropless.quant.modules import QuantizedExperts, QuantizedLinear

    cfg = model.cfg
    keep = ["block_sparse_moe.gate" if model_type == "mixtral" else "mlp.gate"]
    for i, layer in enumerate(model.layers):
        if not isinstance(getattr(layer.attn, "o_proj", None), QuantizedLinear):
            keep.append(f"model.layers.{i}.self_attn.")
        if not layer.is_moe:
            keep.append(f"model.layers.{i}.mlp.")
        elif not isinstance(layer.ffn.experts, QuantizedExperts):
            keep.append(f"model.layers.{i}.{'block_sparse_moe' if model_type == 'mixtral' else 'mlp'}.experts.")
    if cfg.moe.num_shared_experts:
        keep.append("shared_expert")   # also matches DeepSeek's shared_experts and the shared gate
    group = next(b for n, b in model.named_buffers() if n.endswith(".qzeros"))
    qweight = next(b for n, b in model.named_buffers() if n.endswith(".qweight"))
    return {"quant_method": "awq", "bits": 4,
            "group_size": qweight.shape[-2] // group.shape[-2], "zero_point": True,
            "version": "gemm", "modules_to_not_convert": keep}
