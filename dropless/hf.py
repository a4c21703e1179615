"""Hugging Face interop: `from_hf(dir)` reads a HF model directory (config.json + safetensors, single
or sharded) into a dropless Transformer; `to_hf(model, dir)` writes one that transformers loads.

Legend: E experts, D model dim, F expert hidden, H heads, N no-rope head dim, P rope head dim,
C kv latent rank.

The tensor map is one table (`layout`) of (HF tensor, shape, dropless tensor, `kind`). Reading
checks the file against it and reports every problem at once; writing walks it backwards.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dropless.config import ModelConfig
from dropless.files import read_small_json, write_atomic
from dropless.hf_files import check_tensors, open_tensors
from dropless.hf_config import ARCHS, config_from_hf, config_to_hf, infer_model_type
from dropless.model import Transformer
from dropless.tokenizer import delayed_bar

MAX_SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class Entry:
    hf_key: str
    shape: tuple[int, ...]
    key: str                  # dropless state_dict key
    kind: str = "copy"        # copy | gate | up | down (one expert) | gate_up | down_all (fused)
                              # | rope_q | rope_kv (interleaved rope rows)
    expert: int = -1


def _attention_rows(cfg: ModelConfig, hf: str, dl: str, rope: bool):
    H, G, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.dim
    bias = cfg.attention_bias

    def linear(name: str, shape: tuple[int, int], kind="copy", has_bias=False, dl_name=None):
        """The weight [out, in] of an HF linear `name` (dropless's `dl_name`), then its bias."""
        to = f"{dl}.{dl_name or name}"
        yield Entry(f"{hf}.{name}.weight", shape, f"{to}.weight", kind)
        if has_bias:
            yield Entry(f"{hf}.{name}.bias", shape[:1], f"{to}.bias", kind)

    if cfg.attention == "gqa":
        for name, out in (("q", H * Dh), ("k", G * Dh), ("v", G * Dh)):
            yield from linear(f"{name}_proj", (out, D), has_bias=bias)
        yield from linear("o_proj", (D, H * Dh))
        for name, heads in (("q", H), ("k", G)) if cfg.qk_norm else ():
            width = Dh if cfg.qk_norm_scope == "head" else heads * Dh
            yield Entry(f"{hf}.{name}_norm.weight", (width,), f"{dl}.{name}_norm.weight")
        return
    N, P, C, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
    q_kind, kv_kind = ("rope_q", "rope_kv") if rope else ("copy", "copy")
    if cfg.q_lora_rank is None:
        yield from linear("q_proj", (H * (N + P), D), q_kind)
    else:
        R = cfg.q_lora_rank
        yield from linear("q_a_proj", (R, D), has_bias=bias)
        yield Entry(f"{hf}.q_a_layernorm.weight", (R,), f"{dl}.q_a_norm.weight")
        yield from linear("q_b_proj", (H * (N + P), R), q_kind)
    yield from linear("kv_a_proj_with_mqa", (C + P, D), kv_kind, bias, dl_name="kv_a_proj")
    yield Entry(f"{hf}.kv_a_layernorm.weight", (C,), f"{dl}.kv_a_norm.weight")
    yield from linear("kv_b_proj", (H * (N + Dv), C))
    yield from linear("o_proj", (D, H * Dv), has_bias=bias)


def _swiglu_rows(hf: str, dl: str, dim: int, hidden: int):
    shapes = {"gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}
    return [Entry(f"{hf}.{n}.weight", shape, f"{dl}.{n}.weight") for n, shape in shapes.items()]


def layout(cfg: ModelConfig, model_type: str, fused_layers: frozenset[int] = frozenset(),
           rope_interleave: bool = True):
    """Every HF tensor of the model, in file order. `fused_layers`: layers whose experts are stored
    as one gate_up_proj [E, 2F, D] and one down_proj [E, D, F] instead of one set per expert.
    `rope_interleave` (DeepSeek's config flag): the rope rows of q and kv_a come in pairs."""
    spec, D, m = ARCHS[model_type], cfg.dim, cfg.moe
    E, F = m.num_experts, m.hidden_dim
    rows = [Entry("model.embed_tokens.weight", (cfg.vocab_size, D), "embed.weight")]
    for i in range(cfg.num_layers):
        hf, dl = f"model.layers.{i}", f"layers.{i}"
        rows.append(Entry(f"{hf}.input_layernorm.weight", (D,), f"{dl}.attn_norm.weight"))
        rows.extend(_attention_rows(cfg, f"{hf}.self_attn", f"{dl}.attn", rope_interleave))
        rows.append(Entry(f"{hf}.post_attention_layernorm.weight", (D,), f"{dl}.ffn_norm.weight"))
        if i < cfg.first_dense_layers:
            rows.extend(_swiglu_rows(f"{hf}.mlp", f"{dl}.ffn", D, cfg.dense_hidden))
            continue
        moe = f"{hf}.{spec.moe_module}"
        rows.append(Entry(f"{moe}.gate.weight", (E, D), f"{dl}.ffn.router.weight"))
        if spec.sigmoid_router:
            rows.append(Entry(f"{moe}.gate.e_score_correction_bias", (E,), f"{dl}.ffn.router.bias"))
        if i in fused_layers:
            rows.append(Entry(f"{moe}.experts.gate_up_proj", (E, 2 * F, D),
                              f"{dl}.ffn.experts.gate_up", "gate_up"))
            rows.append(Entry(f"{moe}.experts.down_proj", (E, D, F), f"{dl}.ffn.experts.down",
                              "down_all"))
        else:
            for e in range(E):
                gate, up, down = (f"{moe}.experts.{e}.{n}.weight" for n in spec.expert_names)
                rows.append(Entry(gate, (F, D), f"{dl}.ffn.experts.gate_up", "gate", e))
                rows.append(Entry(up, (F, D), f"{dl}.ffn.experts.gate_up", "up", e))
                rows.append(Entry(down, (D, F), f"{dl}.ffn.experts.down", "down", e))
        if m.num_shared_experts:
            rows.extend(_swiglu_rows(f"{moe}.{spec.shared}", f"{dl}.ffn.shared", D, m.shared_hidden))
        if m.shared_gate:
            rows.append(Entry(f"{moe}.shared_expert_gate.weight", (1, D), f"{dl}.ffn.shared_gate.weight"))
    rows.append(Entry("model.norm.weight", (D,), "norm.weight"))
    if not cfg.tie_embeddings:
        rows.append(Entry("lm_head.weight", (cfg.vocab_size, D), "lm_head.weight"))
    return rows


def _rope_perm(cfg: ModelConfig, kind: str, rows: int, to_half_split: bool) -> torch.Tensor:
    """Row order that turns DeepSeek's interleaved rope pairs (x0, x1), (x2, x3)... into dropless's
    half-split pairs (x_i, x_{i+P/2}) (or back). Rotating the de-interleaved vector with
    rotate_half is exactly HF's interleaved rotation, and q.k is unchanged when q and k are
    permuted alike."""
    N, P = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    rope = torch.cat([torch.arange(0, P, 2), torch.arange(1, P, 2)])
    if not to_half_split:
        rope = torch.argsort(rope)
    if kind == "rope_kv":
        C = cfg.kv_lora_rank
        return torch.cat([torch.arange(C), C + rope])
    head = torch.cat([torch.arange(N), N + rope])
    return torch.cat([h * (N + P) + head for h in range(rows // (N + P))])


# ---- reading ---------------------------------------------------------------------------------------

def stored_dtype(path) -> torch.dtype:
    """bfloat16 where every tensor of a HF directory's weights is stored so (reading it as bf16
    is then exact, at half of float32's bytes), else float32. The router's selection bias is
    read as float32 either way (from_hf), so DeepSeek-V3's fp32 one does not count."""
    where = open_tensors(Path(path))
    bf16 = all(d == "BF16" for k, (_, _, d) in where.items()
               if not k.endswith("e_score_correction_bias"))
    return torch.bfloat16 if bf16 else torch.float32


def expert_cols(kind: str, width: int) -> slice:
    """One expert's columns in a stack whose last dim is gate then up, `width` each (F in dropless's
    gate_up [E, D, 2F], F/8 or F in the AWQ buffers), or all of a down stack's."""
    return {"gate": slice(0, width), "up": slice(width, 2 * width), "down": slice(None)}[kind]


def _fill(state: dict, row: Entry, t: torch.Tensor, cfg: ModelConfig) -> None:
    E, D, F = cfg.moe.num_experts, cfg.dim, cfg.moe.hidden_dim
    if row.kind == "copy":
        state[row.key] = t
    elif row.kind in ("rope_q", "rope_kv"):
        state[row.key] = t[_rope_perm(cfg, row.kind, t.shape[0], to_half_split=True)]
    elif row.kind in ("gate_up", "down_all"):
        state[row.key] = t.transpose(1, 2)   # HF [E, out, in] -> dropless [E, in, out]
    else:
        if row.key not in state:
            shape = (E, D, 2 * F) if row.kind in ("gate", "up") else (E, F, D)
            state[row.key] = torch.empty(shape, dtype=t.dtype, device=t.device)
        state[row.key][row.expert, :, expert_cols(row.kind, F)] = t.T


def read_hf_config(path) -> dict:
    """config.json as read (a JSON object is not yet checked: `config_from_hf` does that)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    config = path / "config.json"
    if not config.exists():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    return read_small_json(config, path)


def from_hf(path, dtype: torch.dtype = torch.float32, device="cpu",
            matmul_dtype: torch.dtype | None = None) -> Transformer:
    """Read a HF model directory into a dropless Transformer (weights cast to `dtype`, the matmul
    weights (optim.matmul_weights) to `matmul_dtype` when given; the router's selection bias
    stays float32)."""
    from safetensors import safe_open

    from dropless.optim import matmul_weights

    path = Path(path)
    hf_cfg = read_hf_config(path)
    cfg = config_from_hf(hf_cfg, str(path / "config.json"))
    spec = ARCHS[hf_cfg["model_type"]]
    where = open_tensors(path)
    # layout's key -> the file's: transformers 5's in-memory name (fused files) is always mlp
    file_key = {k.replace(".mlp.", f".{spec.moe_module}."): k for k in where}
    where = {k: where[v] for k, v in file_key.items()}
    fused = frozenset(i for i in range(cfg.num_layers) if any(
        k.startswith(f"model.layers.{i}.") and k.endswith("experts.gate_up_proj") for k in where))
    rows = layout(cfg, hf_cfg["model_type"], fused, hf_cfg.get("rope_interleave", True) is not False)
    # DeepSeek-V3 files may carry multi-token-prediction layers after the last layer: not used here
    extra = hf_cfg.get("num_nextn_predict_layers") or 0   # range-checked by config_from_hf
    mtp = tuple(f"model.layers.{i}." for i in range(cfg.num_layers, cfg.num_layers + extra))
    awq = None
    if hf_cfg.get("quantization_config"):   # AutoAWQ: packed tensors stand in for `.weight`s
        from dropless.quant.hf_awq import AwqFile
        awq = AwqFile(hf_cfg, cfg, where, file_key, rows)
        where = awq.where
    # an empty tensor holds no weight: transformers saves DeepSeek's shared experts with
    # n_shared_experts=0 as [0, D] / [D, 0] tensors
    check_tensors(path, where, rows, lambda k: k.startswith(mtp)   # startswith(()) is False
                  or (cfg.tie_embeddings and k == "lm_head.weight") or 0 in where[k][1])
    with torch.device("meta"):
        model = Transformer(cfg)
        if awq is not None:
            from dropless.quant.modules import quantize_modules
            quantize_modules(model, awq.qcfg)
    matmul = set(matmul_weights(model)) if matmul_dtype is not None else set()
    state, handles = {}, {}
    for row in delayed_bar(rows, f"read {path.name}", unit="tensor"):
        if awq is not None and awq.keeps_packed(row):
            awq.fill_packed(state, row)
            continue
        f = where[row.hf_key][0]
        try:
            if f not in handles:
                handles[f] = safe_open(f, "pt", device="cpu")
            t = awq.dequantized(row) if awq is not None else None
            if t is None:
                t = handles[f].get_tensor(file_key[row.hf_key])
        except Exception as err:
            raise ValueError(f"{f}: cannot read {row.hf_key} (truncated or corrupt file?): "
                             f"{err}") from err
        # each tensor goes to `device` as it is read: the host never holds the whole model
        want = (torch.float32 if row.key.endswith("router.bias")
                else matmul_dtype if row.key in matmul else dtype)
        _fill(state, row, t.to(device, want), cfg)
    if cfg.tie_embeddings:   # HF stores the tied matrix once, as the embedding
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.to(device)


# ---- writing ---------------------------------------------------------------------------------------

def _hf_tensor(state: dict, row: Entry, cfg: ModelConfig) -> torch.Tensor:
    t = state[row.key]
    if row.kind in ("rope_q", "rope_kv"):
        t = t[_rope_perm(cfg, row.kind, t.shape[0], to_half_split=False)]
    elif row.kind in ("gate_up", "down_all"):
        t = t.transpose(1, 2)
    elif row.kind != "copy":
        t = t[row.expert, :, expert_cols(row.kind, cfg.moe.hidden_dim)].T
    return t.detach().clone(memory_format=torch.contiguous_format)


def _row_tensors(state: dict, row: Entry, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF tensors of one layout row, new contiguous copies (meta ones from a meta state)."""
    from dropless.quant import hf_awq

    return hf_awq.packed_tensors(state, row, cfg) or {row.hf_key: _hf_tensor(state, row, cfg)}


_OUR_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, the file then readable as the umask allows, like every other file
    written here (safetensors writes a private 0600 temp file and renames it into place)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def to_hf(model: Transformer, path, model_type: str | None = None,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`) that
    transformers loads as `model_type` (default: inferred from the config)."""

    cfg = model.cfg
    model_type = model_type or infer_model_type(cfg)
    hf_cfg = config_to_hf(cfg, model_type)
    state = dict(model.state_dict())
    for moe_key in [k for k in state if k.endswith("ffn.router.weight")]:
        bias_key = moe_key[:-len("weight")] + "bias"
        if ARCHS[model_type].sigmoid_router and bias_key not in state:   # HF always has it
            state[bias_key] = torch.zeros(cfg.moe.num_experts)
    hf_cfg["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    from dropless.quant import hf_awq
    if hf_awq.is_quantized(model):   # AutoAWQ GEMM tensors for the packed modules
        hf_cfg["quantization_config"] = hf_awq.quantization_config(model, model_type)
    # shards are planned on meta copies and each is built only as it is written: the host holds
    # the model and one shard (at most max_shard_bytes), not a second copy of the model
    meta = {k: v.to("meta") for k, v in state.items()}
    shards, sizes = [[]], [0]
    for row in layout(cfg, model_type):
        nbytes = sum(t.nbytes for t in _row_tensors(meta, row, cfg).values())
        if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(row)
        sizes[-1] += nbytes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / "config.json", (json.dumps(hf_cfg, indent=2) + "\n").encode())
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {}
    with delayed_bar(total=sum(sizes), desc=f"write {path.name}", unit="B", unit_scale=True) as bar:
        for name, shard, size in zip(names if n > 1 else ["model.safetensors"], shards, sizes):
            tensors = {k: t for row in shard for k, t in _row_tensors(state, row, cfg).items()}
            save_safetensors(tensors, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
            bar.update(size)
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        write_atomic(path / "model.safetensors.index.json",
                     (json.dumps(index, indent=2) + "\n").encode())
    # a previous save's weights that this one did not overwrite go, as save_pretrained's do: a stale
    # index (or a stale model.safetensors, which transformers prefers to an index) would be loaded
    # instead of the weights just written
    written = {"model.safetensors.index.json", *names} if n > 1 else {"model.safetensors"}
    for old in path.glob("model*.safetensors*"):
        if old.name not in written and _OUR_WEIGHTS.fullmatch(old.name):
            old.unlink()
