"""Translate Hugging Face config.json dicts to and from ModelConfig, per architecture.

Everything a supported model needs is either mapped exactly or refused with a ValueError naming the
field and value: nothing is ignored silently. Reading needs no transformers import.
"""

from __future__ import annotations

from dropless.config import ModelConfig, MoEConfig

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
DEFAULT_THETA = {"mixtral": 1e6}      # everyone else: 1e4
# HF's Switch loss counts f_i over T tokens (balanced value K * coef); dropless over T*K (balanced
# value coef). Imported coefficients are multiplied by K so training pushes equally hard.
DEEPSEEK_BALANCE_COEF = 1e-4          # DeepSeek-V3's sequence-wise loss weight
DEEPSEEK_BIAS_RATE = 1e-3             # aux-loss-free bias update rate of DeepSeek-V3


def _refuse(name: str, value, why: str):
    raise ValueError(f"unsupported Hugging Face config: {name}={value!r} ({why})")


def _require(hf: dict, name: str, ok, default=None, why: str = "") -> None:
    value = hf.get(name, default)
    if not ok(value):
        _refuse(name, value, why)


def _rope_theta(hf: dict, model_type: str) -> float:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (older files); plain RoPE only."""
    params = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        params.update(hf["rope_scaling"])
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        _refuse("rope_type", rope_type, "only plain RoPE ('default') is implemented; no yarn, "
                "linear, dynamic, llama3 or longrope scaling")
    for source in (params, hf):
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse("partial_rotary_factor", source["partial_rotary_factor"], "must be 1.0")
    return float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA.get(model_type, 1e4))))


def _dense_prefix(hf: dict) -> int:
    """Qwen's mlp_only_layers / decoder_sparse_step, accepted when they mean 'the first k layers are
    dense' (dropless first_dense_layers)."""
    _require(hf, "decoder_sparse_step", lambda v: v in (None, 1), 1,
             "MoE on every layer only; interleaved dense layers are not implemented")
    layers = sorted(hf.get("mlp_only_layers") or [])
    if layers != list(range(len(layers))):
        _refuse("mlp_only_layers", layers, "only a leading run of dense layers [0, 1, ..., k-1] "
                "is implemented")
    return len(layers)


def config_from_hf(hf: dict) -> ModelConfig:
    try:
        return _config_from_hf(hf)
    except KeyError as err:
        raise ValueError(f"config.json lacks the field {err.args[0]!r} that model_type="
                         f"{hf.get('model_type')!r} needs") from None


def _config_from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported: allowed: "
                         f"{', '.join(map(repr, ARCHITECTURES))}")
    _require(hf, "hidden_act", lambda v: v == "silu", "silu", "experts must be SwiGLU")
    if hf.get("quantization_config"):   # AutoAWQ GEMM only; anything else is refused by name
        from dropless.quant.hf_awq import awq_settings
        awq_settings(hf)
    _require(hf, "attention_dropout", lambda v: not v, 0.0, "attention dropout is not implemented")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    common = dict(
        vocab_size=hf["vocab_size"], dim=dim, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=_rope_theta(hf, model_type), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim != dim // heads or dim % heads:
        common["head_dim"] = head_dim
    top_k = hf.get("num_experts_per_tok")
    balance = dict(balance_loss_coef=hf.get("router_aux_loss_coef", 0.0) * (top_k or 1))
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))

    if model_type == "mixtral":
        _require(hf, "sliding_window", lambda v: v is None or v >= common["max_seq_len"], None,
                 "sliding-window attention is not implemented")
        _require(hf, "router_jitter_noise", lambda v: not v, 0.0, "router jitter is not implemented")
        moe = MoEConfig(dim=dim, hidden_dim=hf["intermediate_size"], num_experts=num_experts,
                        top_k=top_k, norm_topk_prob=True, **balance)
        return ModelConfig(moe=moe, **common)

    if model_type in ("olmoe", "qwen3_moe", "qwen2_moe"):
        if model_type == "olmoe":
            _require(hf, "clip_qkv", lambda v: v is None, None, "q/k/v clipping is not implemented")
        if model_type in ("olmoe", "qwen3_moe"):
            _require(hf, "attention_bias", lambda v: not v, False,
                     "an o_proj bias is not implemented")
        if model_type.startswith("qwen"):
            _require(hf, "use_sliding_window", lambda v: not v, False,
                     "sliding-window attention is not implemented")
            _require(hf, "layer_types", lambda v: v is None or set(v) <= {"full_attention"}, None,
                     "only full attention layers are implemented")
        moe_hidden = hf["intermediate_size"] if model_type == "olmoe" else hf["moe_intermediate_size"]
        extra = {}
        if model_type == "qwen2_moe":
            extra = dict(num_shared_experts=1, shared_gate=True,
                         shared_hidden_dim=hf["shared_expert_intermediate_size"])
            common["attention_bias"] = bool(hf.get("qkv_bias", True))
        moe = MoEConfig(dim=dim, hidden_dim=moe_hidden, num_experts=num_experts, top_k=top_k,
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)), **balance, **extra)
        if model_type != "olmoe":
            common.update(first_dense_layers=_dense_prefix(hf),
                          dense_hidden_dim=hf["intermediate_size"])
        else:
            common.update(qk_norm=True, qk_norm_scope="proj")
        if model_type == "qwen3_moe":
            common.update(qk_norm=True, qk_norm_scope="head")
        return ModelConfig(moe=moe, **common)

    # deepseek_v3
    _require(hf, "num_key_value_heads", lambda v: v in (None, heads), heads,
             "MLA has no key/value head groups: must equal num_attention_heads")
    _require(hf, "scoring_func", lambda v: v == "sigmoid", "sigmoid", "DeepSeek-V3 routes by sigmoid")
    _require(hf, "topk_method", lambda v: v == "noaux_tc", "noaux_tc",
             "DeepSeek-V3 routes with the aux-free bias ('noaux_tc')")
    _require(hf, "moe_layer_freq", lambda v: v == 1, 1, "MoE on every layer after the dense ones")
    n_group = hf.get("n_group") or 1
    groups = dict(num_groups=n_group, topk_groups=hf.get("topk_group") or 1) if n_group > 1 else {}
    moe = MoEConfig(dim=dim, hidden_dim=hf["moe_intermediate_size"], num_experts=hf["n_routed_experts"],
                    top_k=top_k, score_func="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                    route_scale=float(hf.get("routed_scaling_factor", 1.0)),
                    num_shared_experts=hf.get("n_shared_experts") or 0,
                    balance_loss_coef=DEEPSEEK_BALANCE_COEF, bias_update_rate=DEEPSEEK_BIAS_RATE,
                    **groups)
    nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
    common.pop("head_dim", None)
    if dim % heads:
        common["head_dim"] = nope + rope
    return ModelConfig(moe=moe, attention="mla", q_lora_rank=hf.get("q_lora_rank"),
                       kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                       v_head_dim=hf["v_head_dim"], attention_bias=bool(hf.get("attention_bias", False)),
                       first_dense_layers=hf.get("first_k_dense_replace") or 0,
                       dense_hidden_dim=hf["intermediate_size"], **common)


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF architecture that can hold this config (config_to_hf checks the details)."""
    if cfg.attention == "mla":
        return "deepseek_v3"
    if cfg.moe.shared_gate:
        return "qwen2_moe"
    if cfg.qk_norm:
        return "olmoe" if cfg.qk_norm_scope == "proj" else "qwen3_moe"
    return "mixtral"


def _mismatches(cfg: ModelConfig, model_type: str) -> list[str]:
    m, bad = cfg.moe, []

    def need(ok: bool, what: str):
        if not ok:
            bad.append(what)

    mla = model_type == "deepseek_v3"
    need(cfg.attention == ("mla" if mla else "gqa"), f"attention={cfg.attention!r}")
    need(m.score_func == ("sigmoid" if mla else "softmax"), f"moe.score_func={m.score_func!r}")
    need(cfg.qk_norm == (model_type in ("olmoe", "qwen3_moe")), f"qk_norm={cfg.qk_norm}")
    if cfg.qk_norm:
        need(cfg.qk_norm_scope == ("proj" if model_type == "olmoe" else "head"),
             f"qk_norm_scope={cfg.qk_norm_scope!r}")
    need(not cfg.attention_bias or model_type in ("qwen2_moe", "deepseek_v3"),
         f"attention_bias={cfg.attention_bias}")
    need(m.shared_gate == (model_type == "qwen2_moe"), f"moe.shared_gate={m.shared_gate}")
    if model_type == "qwen2_moe":
        need(m.num_shared_experts > 0, f"moe.num_shared_experts={m.num_shared_experts}")
    elif mla:
        need(m.shared_hidden_dim in (None, m.shared_hidden),
             f"moe.shared_hidden_dim={m.shared_hidden_dim} (must be num_shared_experts * hidden_dim)")
    else:
        need(m.num_shared_experts == 0, f"moe.num_shared_experts={m.num_shared_experts}")
    if not mla:
        need(m.route_scale == 1.0, f"moe.route_scale={m.route_scale}")
        need(m.num_groups is None, f"moe.num_groups={m.num_groups}")
    if model_type == "mixtral":
        need(m.norm_topk_prob, f"moe.norm_topk_prob={m.norm_topk_prob}")
    if model_type in ("mixtral", "olmoe"):
        need(cfg.first_dense_layers == 0, f"first_dense_layers={cfg.first_dense_layers}")
    if model_type in ("olmoe", "qwen2_moe"):
        need(cfg.head_size * cfg.num_heads == cfg.dim, f"head_dim={cfg.head_dim}")
    return bad


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict:
    model_type = model_type or infer_model_type(cfg)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} is not supported: allowed: "
                         f"{', '.join(map(repr, ARCHITECTURES))}")
    bad = _mismatches(cfg, model_type)
    if bad:
        raise ValueError(f"this model cannot be written as HF {model_type!r}: " + "; ".join(bad))
    m = cfg.moe
    hf = dict(architectures=[ARCHITECTURES[model_type]], model_type=model_type, hidden_act="silu",
              vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
              rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
              num_experts_per_tok=m.top_k, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type != "deepseek_v3":
        hf["router_aux_loss_coef"] = m.balance_loss_coef / m.top_k
    if model_type in ("mixtral", "qwen3_moe"):
        hf["head_dim"] = cfg.head_size
    if model_type == "mixtral":
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.hidden_dim,
                  sliding_window=None)
    elif model_type == "olmoe":
        hf.update(num_experts=m.num_experts, intermediate_size=m.hidden_dim, clip_qkv=None,
                  norm_topk_prob=m.norm_topk_prob, attention_bias=False)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        hf.update(num_experts=m.num_experts, moe_intermediate_size=m.hidden_dim,
                  intermediate_size=cfg.dense_hidden, norm_topk_prob=m.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_dense_layers)),
                  use_sliding_window=False)
        if model_type == "qwen2_moe":
            hf.update(shared_expert_intermediate_size=m.shared_hidden, qkv_bias=cfg.attention_bias)
        else:
            hf["attention_bias"] = False
    else:
        hf.update(n_routed_experts=m.num_experts, moe_intermediate_size=m.hidden_dim,
                  intermediate_size=cfg.dense_hidden, n_shared_experts=m.num_shared_experts,
                  routed_scaling_factor=m.route_scale, norm_topk_prob=m.norm_topk_prob,
                  n_group=m.num_groups or 1, topk_group=m.topk_groups or 1,
                  first_k_dense_replace=cfg.first_dense_layers, q_lora_rank=cfg.q_lora_rank,
                  kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                  attention_bias=cfg.attention_bias, rope_interleave=True,
                  num_nextn_predict_layers=0)
    return hf
