"""Translate Hugging Face config.json dicts to and from ModelConfig: one `Arch` spec per architecture.

Everything a supported model needs is either mapped exactly or refused with a ValueError naming the
field and value: nothing is ignored silently. Every number is type- and range-checked (`LIMITS`)
before anything is built, so a hostile or broken config.json fails in microseconds with one line.
Reading needs no transformers import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from dropless.config import LIMITS, ModelConfig, MoEConfig

# config.json's sizes are checked against ModelConfig's LIMITS as they are read, under the file's
# names; weights are then read tensor by tensor, each checked against the file's declared shape,
# so no size in config.json alone can make the reader allocate.
MAX_TENSORS = 2**20           # expert tensors in the file layout (DeepSeek-V3 has ~47k)
# HF's Switch loss counts f_i over T tokens (balanced value K * coef); dropless over T*K (balanced
# value coef). Imported coefficients are multiplied by K so training pushes equally hard.
DEEPSEEK_BALANCE_COEF = 1e-4          # DeepSeek-V3's sequence-wise loss weight
DEEPSEEK_BIAS_RATE = 1e-3             # aux-loss-free bias update rate of DeepSeek-V3
_REQUIRED = object()
# ModelConfig / MoEConfig field -> config.json field, for their errors about a file's sizes
_HF_NAMES = dict(num_kv_heads="num_key_value_heads", num_heads="num_attention_heads",
                 dim="hidden_size", num_groups="n_group", topk_groups="topk_group",
                 top_k="num_experts_per_tok")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

# (config.json field, ok(value, config), value meaning "off" (assumed when absent; written by
# config_to_hf unless None), why it is refused otherwise)
Refusal = tuple[str, Callable[[Any, dict], bool], Any, str]


def _quantization_ok(value, hf: dict) -> bool:
    """AutoAWQ GEMM checkpoints are read (dropless.quant); anything else is refused by name."""
    if value:
        from dropless.quant.hf_awq import awq_settings
        awq_settings(hf)   # raises a ValueError naming the unsupported method or field
    return True


_NO_O_BIAS = ("attention_bias", lambda v, hf: not v, False, "an o_proj bias is not implemented")
COMMON_REFUSALS: tuple[Refusal, ...] = (
    ("hidden_act", lambda v, hf: v == "silu", "silu", "experts must be SwiGLU"),
    ("quantization_config", _quantization_ok, None, "only AutoAWQ GEMM checkpoints are read"),
    ("attention_dropout", lambda v, hf: not v, 0.0, "attention dropout is not implemented"),
)


@dataclass(frozen=True, kw_only=True)
class Arch:
    """Everything one HF architecture differs in: its config.json names, its tensor names (used by
    hf.layout) and what it refuses. Adding an architecture is adding one of these to ARCHS."""

    hf_class: str
    experts: tuple[str, ...]            # config.json fields naming the number of routed experts
                                        # (aliases; the first is written)
    expert_hidden: str                  # config.json field: hidden size of one expert
    rope_theta: float = 1e4             # default when config.json has none
    max_positions: int = 4096           # max_position_embeddings default
    norm_eps: float = 1e-6              # rms_norm_eps default (transformers' config class's)
    norm_topk: bool | None = False      # norm_topk_prob default; None = always on, no field
    head_dim: bool = False              # head_dim is a free field (else dim // heads exactly)
    qk_norm: str | None = None          # "head" (per head) | "proj" (whole projection)
    bias_field: str | None = None       # field switching on q/k/v (and MLA) biases
    bias_default: bool = False
    dense_prefix: str | None = None     # "mlp_only_layers" (Qwen) | "first_k_dense_replace"
    shared: str | None = None           # module of the shared experts; "shared_expert" = Qwen2's
                                        # single gated one, "shared_experts" = n_shared_experts
    sigmoid_router: bool = False        # DeepSeek routing: sigmoid + correction bias + groups
    mla: bool = False                   # multi-head latent attention
    moe_module: str = "mlp"             # module name of the MoE block in saved files
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    refuse: tuple[Refusal, ...] = ()


_QWEN_REFUSALS = (("use_sliding_window", lambda v, hf: not v, False,
                   "sliding-window attention is not implemented"),
                  ("layer_types", lambda v, hf: v is None or set(v) <= {"full_attention"}, None,
                   "only full attention layers are implemented"),
                  ("decoder_sparse_step", lambda v, hf: v in (None, 1), 1,
                   "MoE on every layer only; interleaved dense layers are not implemented"))
_QWEN = dict(experts=("num_experts", "num_local_experts"), expert_hidden="moe_intermediate_size",
             dense_prefix="mlp_only_layers", max_positions=32768)
ARCHS: dict[str, Arch] = {
    "mixtral": Arch(
        hf_class="MixtralForCausalLM", experts=("num_local_experts", "num_experts"),
        expert_hidden="intermediate_size", rope_theta=1e6, max_positions=131072, norm_eps=1e-5,
        norm_topk=None, head_dim=True, moe_module="block_sparse_moe",
        expert_names=("w1", "w3", "w2"),
        refuse=(("sliding_window", lambda v, hf: v is None or v >= hf.get("max_position_embeddings",
                 131072), None, "sliding-window attention is not implemented"),
                ("router_jitter_noise", lambda v, hf: not v, 0.0, "router jitter is not implemented"))),
    "olmoe": Arch(
        hf_class="OlmoeForCausalLM", experts=("num_experts", "num_local_experts"),
        expert_hidden="intermediate_size", norm_eps=1e-5, qk_norm="proj",
        refuse=(("clip_qkv", lambda v, hf: v is None, None, "q/k/v clipping is not implemented"),
                _NO_O_BIAS)),
    "qwen2_moe": Arch(hf_class="Qwen2MoeForCausalLM", **_QWEN, bias_field="qkv_bias",
                      bias_default=True, shared="shared_expert", refuse=_QWEN_REFUSALS),
    "qwen3_moe": Arch(hf_class="Qwen3MoeForCausalLM", **_QWEN, head_dim=True, qk_norm="head",
                      refuse=(*_QWEN_REFUSALS, _NO_O_BIAS)),
    "deepseek_v3": Arch(
        hf_class="DeepseekV3ForCausalLM", experts=("n_routed_experts",),
        expert_hidden="moe_intermediate_size", norm_topk=True, bias_field="attention_bias",
        dense_prefix="first_k_dense_replace", shared="shared_experts", sigmoid_router=True,
        mla=True,
        refuse=(("num_key_value_heads", lambda v, hf: v in (None, hf.get("num_attention_heads")),
                 None, "MLA has no key/value head groups: must equal num_attention_heads"),
                ("scoring_func", lambda v, hf: v == "sigmoid", "sigmoid",
                 "DeepSeek-V3 routes by sigmoid"),
                ("topk_method", lambda v, hf: v == "noaux_tc", "noaux_tc",
                 "DeepSeek-V3 routes with the aux-free bias ('noaux_tc')"),
                ("moe_layer_freq", lambda v, hf: v == 1, 1, "MoE on every layer after the dense ones"))),
}


# ---- typed, bounded reads of config.json ------------------------------------------------------------

def _bad(name: str, value, allowed: str):
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _value(hf: dict, name: str, default):
    value = hf.get(name)
    if value is None:   # JSON null counts as absent
        if default is _REQUIRED:
            raise ValueError(f"lacks the field {name!r} that model_type={hf.get('model_type')!r} needs")
        return default
    return value


def _int(hf: dict, name: str, default=_REQUIRED, lo: int = 1, hi: int = LIMITS["dim"]):
    value = _value(hf, name, default)
    if value is not None and (type(value) is not int or not lo <= value <= hi):
        absent = " (the field is absent: this is its default)" if hf.get(name) is None else ""
        _bad(name, value, f"must be an integer in [{lo}, {hi}]{absent}")
    return value


def _float(hf: dict, name: str, default, lo: float = 0.0, hi: float = math.inf, lo_open=True):
    value = _value(hf, name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (lo_open and value == lo) or value > hi:
        _bad(name, value, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


def _bool(hf: dict, name: str, default=False, kind=bool, what="must be true or false"):
    value = _value(hf, name, default)
    if not isinstance(value, kind):
        _bad(name, value, what)
    return value


def _arch(model_type) -> Arch:
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise ValueError(f"model_type={model_type!r} is not supported: allowed: "
                         f"{', '.join(map(repr, ARCHS))}")
    return ARCHS[model_type]


def _refuse(name: str, value, why: str):
    raise ValueError(f"unsupported Hugging Face config: {name}={value!r} ({why})")


def _rope_theta(hf: dict, default: float) -> float:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older files); plain RoPE only."""
    sources = [_bool(hf, "rope_parameters", {}, dict, "must be an object"),
               _bool(hf, "rope_scaling", {}, dict, "must be an object")]
    params = {**sources[0], **sources[1]}
    # each object's own type: transformers applies rope_scaling's legacy "type" even beside a
    # rope_parameters that says "default"
    for rope_type in (t for src in sources for t in (src.get("rope_type"), src.get("type"))):
        if rope_type not in (None, "default"):
            _refuse("rope_type", rope_type, "only plain RoPE ('default') is implemented; no yarn, "
                    "linear, dynamic, llama3 or longrope scaling")
    for source in (params, hf):
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse("partial_rotary_factor", source["partial_rotary_factor"], "must be 1.0")
    return _float(params if "rope_theta" in params else hf, "rope_theta", default)


def _dense_prefix(hf: dict, spec: Arch, num_layers: int) -> int:
    """Leading dense layers: DeepSeek's first_k_dense_replace, or Qwen's mlp_only_layers when
    they mean 'the first k layers are dense'."""
    if spec.dense_prefix == "first_k_dense_replace":
        return _int(hf, "first_k_dense_replace", 3, lo=0, hi=num_layers)   # DeepseekV3Config's
    layers = _value(hf, "mlp_only_layers", [])
    if not (isinstance(layers, list) and all(type(i) is int for i in layers)
            and sorted(layers) == list(range(len(layers)))):
        _refuse("mlp_only_layers", layers, "only a leading run of dense layers [0, 1, ..., k-1] "
                "is implemented")
    return len(layers)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A checked ModelConfig; every error is one line starting with `source` (the file)."""
    try:
        if not isinstance(hf, dict):
            raise ValueError(f"must hold a JSON object, not {type(hf).__name__}")
        return _config_from_hf(hf)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None


def _config_from_hf(hf: dict) -> ModelConfig:
    spec = _arch(hf.get("model_type"))
    dim = _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads", hi=LIMITS["heads"])
    num_layers = _int(hf, "num_hidden_layers", hi=LIMITS["layers"])
    E = _int(hf, next((n for n in spec.experts if n in hf), spec.experts[0]), hi=LIMITS["experts"])
    top_k = _int(hf, "num_experts_per_tok", hi=E)
    _int(hf, "num_nextn_predict_layers", 0, lo=0, hi=LIMITS["layers"])   # DeepSeek's extra layers
    if num_layers * 3 * E > MAX_TENSORS:
        raise ValueError(f"{num_layers} layers of {E} experts are {num_layers * 3 * E} expert "
                         f"tensors, more than the limit {MAX_TENSORS}")
    common = dict(
        vocab_size=_int(hf, "vocab_size", hi=LIMITS["vocab"]), dim=dim, num_layers=num_layers,
        num_heads=heads, num_kv_heads=_int(hf, "num_key_value_heads", heads, hi=LIMITS["heads"]),
        max_seq_len=_int(hf, "max_position_embeddings", spec.max_positions, hi=LIMITS["positions"]),
        rope_theta=_rope_theta(hf, spec.rope_theta),
        norm_eps=_float(hf, "rms_norm_eps", spec.norm_eps, hi=1.0),
        tie_embeddings=_bool(hf, "tie_word_embeddings"),
        attention_bias=bool(spec.bias_field) and _bool(hf, spec.bias_field, spec.bias_default))
    # after the sizes are type-checked: a refusal comparing with one (num_key_value_heads against
    # num_attention_heads) must not blame itself for the other's bad value
    for name, ok, off, why in COMMON_REFUSALS + spec.refuse:
        try:
            allowed = ok(hf.get(name, off), hf)
        except TypeError:   # a value of the wrong type
            allowed = False
        if not allowed:
            _refuse(name, hf.get(name), why)
    norm_topk = True if spec.norm_topk is None else _bool(hf, "norm_topk_prob", spec.norm_topk)
    moe = dict(dim=dim, hidden_dim=_int(hf, spec.expert_hidden), num_experts=E, top_k=top_k,
               norm_topk_prob=norm_topk)
    if spec.sigmoid_router:
        # absent fields take DeepseekV3Config's defaults, as transformers would read the file
        n_group = _int(hf, "n_group", 8, hi=E)
        if n_group > 1:
            moe.update(num_groups=n_group, topk_groups=_int(hf, "topk_group", 4, hi=n_group))
        moe.update(score_func="sigmoid", route_scale=_float(hf, "routed_scaling_factor", 2.5),
                   balance_loss_coef=DEEPSEEK_BALANCE_COEF, bias_update_rate=DEEPSEEK_BIAS_RATE)
    else:
        moe["balance_loss_coef"] = top_k * _float(hf, "router_aux_loss_coef", 0.0, lo_open=False)
    if spec.shared == "shared_expert":
        moe.update(num_shared_experts=1, shared_gate=True,
                   shared_hidden_dim=_int(hf, "shared_expert_intermediate_size"))
    elif spec.shared:
        moe["num_shared_experts"] = _int(hf, "n_shared_experts", 1, lo=0, hi=LIMITS["experts"])
    if spec.dense_prefix:
        common.update(first_dense_layers=_dense_prefix(hf, spec, num_layers),
                      dense_hidden_dim=_int(hf, "intermediate_size"))
    if spec.qk_norm:
        common.update(qk_norm=True, qk_norm_scope=spec.qk_norm)
    if spec.mla:
        mla = {n: _int(hf, n, None if n == "q_lora_rank" else _REQUIRED) for n in MLA_FIELDS}
        _bool(hf, "rope_interleave", True)   # read by hf.layout: checked here with the rest
        common.update(mla, attention="mla")
        if dim % heads:
            common["head_dim"] = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]
    else:
        head_dim = _int(hf, "head_dim", dim // heads or 1) if spec.head_dim else dim // heads
        if head_dim != dim // heads or dim % heads:
            common["head_dim"] = head_dim
    try:
        return ModelConfig(moe=MoEConfig(**moe), **common)
    except ValueError as err:   # sizes that do not fit together: named as dropless names them
        name = str(err).split("=", 1)[0]
        hf_names = {**_HF_NAMES, "first_dense_layers": spec.dense_prefix,
                    "num_experts": spec.experts[0]}
        if hf_names.get(name) is None:
            raise
        raise ValueError(f"{err} ({name} is config.json's {hf_names[name]})") from None


# ---- writing ------------------------------------------------------------------------------------------

def _mismatches(cfg: ModelConfig, spec: Arch) -> list[str]:
    """What in `cfg` the architecture cannot express."""
    m = cfg.moe
    checks = [
        (cfg.attention == ("mla" if spec.mla else "gqa"), f"attention={cfg.attention!r}"),
        (m.score_func == ("sigmoid" if spec.sigmoid_router else "softmax"),
         f"moe.score_func={m.score_func!r}"),
        (cfg.qk_norm == bool(spec.qk_norm), f"qk_norm={cfg.qk_norm}"),
        (not cfg.qk_norm or cfg.qk_norm_scope == spec.qk_norm,
         f"qk_norm_scope={cfg.qk_norm_scope!r}"),
        (not cfg.attention_bias or spec.bias_field, f"attention_bias={cfg.attention_bias}"),
        (m.shared_gate == (spec.shared == "shared_expert"), f"moe.shared_gate={m.shared_gate}"),
        (m.norm_topk_prob or spec.norm_topk is not None, f"moe.norm_topk_prob={m.norm_topk_prob}"),
        (cfg.first_dense_layers == 0 or spec.dense_prefix,
         f"first_dense_layers={cfg.first_dense_layers}"),
        (spec.head_dim or spec.mla or cfg.head_size * cfg.num_heads == cfg.dim,
         f"head_dim={cfg.head_dim}"),
    ]
    if spec.shared == "shared_expert":
        checks.append((m.num_shared_experts > 0, f"moe.num_shared_experts={m.num_shared_experts}"))
    elif spec.shared:
        checks.append((m.shared_hidden_dim in (None, m.shared_hidden), f"moe.shared_hidden_dim="
                       f"{m.shared_hidden_dim} (must be num_shared_experts * hidden_dim)"))
    else:
        checks.append((m.num_shared_experts == 0, f"moe.num_shared_experts={m.num_shared_experts}"))
    if not spec.sigmoid_router:
        checks += [(m.route_scale == 1.0, f"moe.route_scale={m.route_scale}"),
                   (m.bias_update_rate == 0, f"moe.bias_update_rate={m.bias_update_rate} (no "
                    "router bias on softmax scores)"),
                   (m.num_groups is None, f"moe.num_groups={m.num_groups}")]
    return [what for ok, what in checks if not ok]


def infer_model_type(cfg: ModelConfig) -> str:
    """The first architecture that can hold this config (the first of all when none can, so that
    config_to_hf names what does not fit)."""
    return next((t for t, spec in ARCHS.items() if not _mismatches(cfg, spec)), next(iter(ARCHS)))


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    model_type = model_type or infer_model_type(cfg)
    spec, m = _arch(model_type), cfg.moe
    bad = _mismatches(cfg, spec)
    if bad:
        raise ValueError(f"this model cannot be written as HF {model_type!r}: " + "; ".join(bad))
    hf = dict(architectures=[spec.hf_class], model_type=model_type, vocab_size=cfg.vocab_size,
              hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings,
              rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
              num_experts_per_tok=m.top_k, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf.update({name: off for name, _, off, _ in COMMON_REFUSALS + spec.refuse if off is not None})
    hf.update({spec.experts[0]: m.num_experts, spec.expert_hidden: m.hidden_dim})
    if spec.norm_topk is not None:
        hf["norm_topk_prob"] = m.norm_topk_prob
    if spec.head_dim:
        hf["head_dim"] = cfg.head_size
    if spec.bias_field:
        hf[spec.bias_field] = cfg.attention_bias
    if spec.sigmoid_router:
        hf.update(routed_scaling_factor=m.route_scale, n_group=m.num_groups or 1,
                  topk_group=m.topk_groups or 1)
    else:
        hf["router_aux_loss_coef"] = m.balance_loss_coef / m.top_k
    if spec.dense_prefix:   # Qwen's mlp_only_layers lists the layers, DeepSeek's field counts them
        n = cfg.first_dense_layers
        hf[spec.dense_prefix] = list(range(n)) if spec.dense_prefix == "mlp_only_layers" else n
        hf["intermediate_size"] = cfg.dense_hidden
    if spec.shared == "shared_expert":
        hf["shared_expert_intermediate_size"] = m.shared_hidden
    elif spec.shared:
        hf["n_shared_experts"] = m.num_shared_experts
    if spec.mla:
        hf.update({n: getattr(cfg, n) for n in MLA_FIELDS}, rope_interleave=True,
                  num_nextn_predict_layers=0)
    return hf
