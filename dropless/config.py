"""Frozen configs of plain values, validated on construction, and the model presets.

Change a config with `dataclasses.replace`; every field error is a ValueError naming the field, the
value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args, get_origin, get_type_hints

Backend = Literal["auto", "reference", "grouped", "grouped_lowmem", "triton", "blocksparse"]
BACKENDS = get_args(Backend)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


# Upper bounds on sizes, far above any public model (DeepSeek-V3: 61 layers, 256 experts, dim 7168;
# vocabularies stay under 300k), so that a config read from a file (a run's state.json, a Hugging
# Face config.json) cannot ask for a 10^9-expert model: it is refused before a tensor exists.
# `tokens` bounds a training config's global micro-batch, its optimizer step (every micro-batch of a
# step is made before the step, held whole on the device) and its evaluation's windows (held whole
# on the host as int64: 512 MiB): DeepSeek-V3's whole optimizer step (15360 x 4096) fits in one.
# `head` bounds each attention head's widths (public models: 64-256; MLA's rope part 64): the RoPE
# tables are positions x rope width, so a tiny config.json with one wide head asked for gigabytes.
LIMITS = dict(layers=1024, experts=4096, heads=1024, dim=2**18, vocab=2**24, positions=2**24,
              tokens=2**26, head=1024)


def _int_in(name: str, value, low: int = 1, high: int | None = None, *,
            optional: bool = False) -> None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= low
          and (high is None or value <= high))
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    _check(ok or (optional and value is None), name, value, f"must be an integer {allowed}")


def _finite(name: str, value, *, positive: bool, optional: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0))
    _check(ok or (optional and value is None), name, value,
           f"must be {'None or ' if optional else ''}a finite number {'>' if positive else '>='} 0")


def _choice(name: str, value, choices) -> None:
    _check(value in choices, name, value, f"allowed: {', '.join(map(repr, choices))}")


def _check_choices(cfg) -> None:
    """Each Literal-typed field of `cfg` holds one of the values its annotation allows, each
    bool field a bool (a config file's "false" would otherwise read as true), and each str field
    a string (a path: a config file's number would be a TypeError where it is opened)."""
    for name, hint in get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if get_origin(hint) is Literal or hint is bool:
            _choice(name, value, get_args(hint) or (False, True))
        elif hint in (str, str | None):
            _check(isinstance(value, str) or (value is None and hint is not str), name, value,
                   "must be a string" + (" or null" if hint is not str else ""))


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE feed-forward layer: router, routed experts, optional shared experts."""

    dim: int = 512
    hidden_dim: int = 1024          # per expert
    num_experts: int = 8
    top_k: int = 2
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True     # renormalize the k chosen weights to sum 1
    route_scale: float = 1.0        # multiplies the final routing weights
    num_groups: int | None = None   # group-limited routing (DeepSeek-V3); None = off
    topk_groups: int | None = None
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0   # aux-loss-free balancing; 0 = off (no router.bias)
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None   # total hidden of the shared SwiGLU; None = n * hidden_dim
    shared_gate: bool = False       # Qwen2-MoE: shared output scaled by sigmoid(x @ w)
    capacity_factor: float | None = None   # None = dropless
    backend: Backend = "auto"

    def __post_init__(self):
        for name, high in (("dim", LIMITS["dim"]), ("hidden_dim", LIMITS["dim"]),
                           ("num_experts", LIMITS["experts"]), ("top_k", None)):
            _int_in(name, getattr(self, name), high=high)
        _check(self.top_k <= self.num_experts, "top_k", self.top_k,
               f"must be between 1 and num_experts={self.num_experts}")
        _check_choices(self)
        _finite("route_scale", self.route_scale, positive=True)
        if (self.num_groups is None) != (self.topk_groups is None):
            raise ValueError(f"num_groups={self.num_groups!r} and topk_groups={self.topk_groups!r} "
                             "are invalid: set both (group-limited routing) or neither")
        if self.num_groups is not None:
            _int_in("num_groups", self.num_groups)
            _int_in("topk_groups", self.topk_groups)
            _check(self.num_experts % self.num_groups == 0, "num_groups", self.num_groups,
                   f"must divide num_experts={self.num_experts}")
            _check(self.topk_groups <= self.num_groups, "topk_groups", self.topk_groups,
                   f"must be <= num_groups={self.num_groups}")
            reachable = self.topk_groups * (self.num_experts // self.num_groups)
            _check(reachable >= self.top_k, "topk_groups", self.topk_groups,
                   f"leaves {reachable} experts, fewer than top_k={self.top_k}")
        for name in ("balance_loss_coef", "z_loss_coef", "bias_update_rate"):
            _finite(name, getattr(self, name), positive=False)
        _int_in("num_shared_experts", self.num_shared_experts, 0, LIMITS["experts"])
        _int_in("shared_hidden_dim", self.shared_hidden_dim, high=LIMITS["dim"], optional=True)
        _finite("capacity_factor", self.capacity_factor, positive=True, optional=True)

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the always-on shared SwiGLU (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden_dim or self.num_shared_experts * self.hidden_dim


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The MoE transformer language model. `moe.dim` must equal `dim`."""

    vocab_size: int = 256
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None      # None = dim // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False            # RMSNorm on q and k before RoPE (OLMoE, Qwen3)
    qk_norm_scope: Literal["head", "proj"] = "head"   # per head (Qwen3) or whole projection (OLMoE)
    attention_bias: bool = False     # biases on q, k, v projections (Qwen2)
    first_dense_layers: int = 0      # leading blocks with a dense SwiGLU instead of MoE
    dense_hidden_dim: int | None = None   # None = moe.hidden_dim * moe.top_k
    attention: Literal["gqa", "mla"] = "gqa"
    # multi-head latent attention (DeepSeek-V2/V3); used only when attention == "mla"
    q_lora_rank: int | None = None   # None = full-rank query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        for name, kind in (("vocab_size", "vocab"), ("dim", "dim"), ("num_layers", "layers"),
                           ("num_heads", "heads"), ("num_kv_heads", "heads"),
                           ("max_seq_len", "positions")):
            _int_in(name, getattr(self, name), high=LIMITS[kind])
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
               f"must divide num_heads={self.num_heads}")
        if self.head_dim is None:
            _check(self.dim % self.num_heads == 0, "num_heads", self.num_heads,
                   f"must divide dim={self.dim} (or set head_dim)")
        else:
            _int_in("head_dim", self.head_dim, high=LIMITS["dim"])
        for name in ("rope_theta", "norm_eps"):   # NaN, 0 or inf here make every logit NaN
            _finite(name, getattr(self, name), positive=True)
        _check(isinstance(self.first_dense_layers, int)
               and 0 <= self.first_dense_layers <= self.num_layers, "first_dense_layers",
               self.first_dense_layers, f"must be between 0 and num_layers={self.num_layers}")
        _int_in("dense_hidden_dim", self.dense_hidden_dim, high=LIMITS["dim"], optional=True)
        _check_choices(self)
        if self.attention == "mla":
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _int_in(name, getattr(self, name), high=LIMITS["head"])
            _int_in("kv_lora_rank", self.kv_lora_rank, high=LIMITS["dim"])
            _int_in("q_lora_rank", self.q_lora_rank, high=LIMITS["dim"], optional=True)
        else:   # unset, the width is dim // num_heads: bounded all the same
            _check(self.head_size <= LIMITS["head"], "head_dim", self.head_size,
                   f"must be an integer in [1, {LIMITS['head']}]"
                   + ("" if self.head_dim else f" (dim={self.dim} // num_heads={self.num_heads})"))
        # RoPE rotates dim i with dim i + rope_dim/2: an odd width has no such pairs
        _check(self.rope_dim % 2 == 0, "qk_rope_head_dim" if self.attention == "mla" else
               "head_dim", self.rope_dim, "must be even (RoPE rotates pairs of dims)")
        _check(isinstance(self.moe, MoEConfig), "moe", type(self.moe).__name__,
               "must be a MoEConfig")
        _check(self.moe.dim == self.dim, "moe.dim", self.moe.dim, f"must equal dim={self.dim}")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head (MLA rotates only its rope part)."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_size

    @property
    def dense_hidden(self) -> int:
        return self.dense_hidden_dim or self.moe.hidden_dim * self.moe.top_k


def _model(*, dim: int, moe: dict, **kw) -> ModelConfig:
    return ModelConfig(dim=dim, moe=MoEConfig(dim=dim, **moe), **kw)


# Presets. tiny and small train here, medium on a GPU; the others mirror public model shapes for
# `info` and benchmarks and are only ever built on the meta device.
PRESETS: dict[str, ModelConfig] = {
    "tiny": _model(vocab_size=256, dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                   max_seq_len=512, tie_embeddings=True,
                   moe=dict(hidden_dim=128, num_experts=8, top_k=2, z_loss_coef=1e-3)),
    "small": _model(vocab_size=4096, dim=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    max_seq_len=1024,
                    moe=dict(hidden_dim=512, num_experts=16, top_k=2, z_loss_coef=1e-3)),
    # Qwen3-MoE-like, 1.31 B parameters / 0.22 B active at vocab 32768 (0.25 B with the input
    # embedding table, as `info` counts): the GPU training benchmark
    # (benchmarks/train.py) and `dropless train --preset medium --tokenizer bpe --vocab 32768`
    "medium": _model(vocab_size=32768, dim=1024, num_layers=12, num_heads=16, num_kv_heads=4,
                     head_dim=64, max_seq_len=2048, rope_theta=1e6, qk_norm=True, norm_eps=1e-6,
                     moe=dict(hidden_dim=512, num_experts=64, top_k=8, norm_topk_prob=True)),
    "mixtral-8x7b": _model(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                           max_seq_len=32768, rope_theta=1e6,
                           moe=dict(hidden_dim=14336, num_experts=8, top_k=2)),
    "olmoe-1b-7b": _model(vocab_size=50304, dim=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                          max_seq_len=4096, qk_norm=True, qk_norm_scope="proj",
                          moe=dict(hidden_dim=1024, num_experts=64, top_k=8,
                                   norm_topk_prob=False, z_loss_coef=1e-3)),
    "qwen3-30b-a3b": _model(vocab_size=151936, dim=2048, num_layers=48, num_heads=32,
                            num_kv_heads=4, head_dim=128, max_seq_len=40960, rope_theta=1e6,
                            qk_norm=True, norm_eps=1e-6,
                            moe=dict(hidden_dim=768, num_experts=128, top_k=8, norm_topk_prob=True)),
    "deepseek-v3": _model(vocab_size=129280, dim=7168, num_layers=61, num_heads=128,
                          num_kv_heads=128, max_seq_len=4096, first_dense_layers=3,
                          dense_hidden_dim=18432, attention="mla", q_lora_rank=1536,
                          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                          v_head_dim=128, norm_eps=1e-6,
                          moe=dict(hidden_dim=2048, num_experts=256, top_k=8, score_func="sigmoid",
                                   norm_topk_prob=True, route_scale=2.5, num_groups=8,
                                   topk_groups=4, num_shared_experts=1, balance_loss_coef=1e-4,
                                   bias_update_rate=1e-3)),
}


def dense_match(cfg: ModelConfig) -> ModelConfig:
    """The dense model of an MoE's compute per token: every block a dense SwiGLU of hidden
    top_k * hidden_dim, the FLOPs of the k experts a token uses. Only the router's matmul (dim x E
    per layer, under 1% of the FLOPs of these presets) has no dense counterpart."""
    return replace(cfg, first_dense_layers=cfg.num_layers,
                   dense_hidden_dim=cfg.moe.top_k * cfg.moe.hidden_dim)


def more_experts(cfg: ModelConfig, factor: int) -> ModelConfig:
    """`factor` x the experts at the same top-k and hidden: the same compute per token, `factor` x
    the expert parameters."""
    return replace(cfg, moe=replace(cfg.moe, num_experts=factor * cfg.moe.num_experts))


# The trainable MoE presets' partners (benchmarks/moe_vs_dense.py): NAME-dense has the MoE's
# compute per token without experts, NAME-2x twice the experts at that same compute.
for _name in ("tiny", "small", "medium"):
    PRESETS[f"{_name}-dense"] = dense_match(PRESETS[_name])
    PRESETS[f"{_name}-2x"] = more_experts(PRESETS[_name], 2)
del _name


# the presets above that mirror public models: shapes for `dropless info` and benchmarks, built on
# the meta device; training one here would allocate until the host runs out of memory
SHAPE_PRESETS = ("mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3")


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The parallel layout (dropless.parallel.mesh): world size = the product of the degrees."""

    dp_replicate: int = 1   # HSDP replica groups (full copies of the sharded state)
    dp_shard: int = 1       # FSDP degree among ranks that do not split experts
    ep: int = 1             # expert-parallel degree: experts split this many ways

    def __post_init__(self):
        for f in fields(self):   # dp_shard 0 = the rest of the world (parallel.runtime)
            _int_in(f.name, getattr(self, f.name), 0 if f.name == "dp_shard" else 1)

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep

    def check(self, world_size: int | None = None, num_experts: int | None = None) -> None:
        """Raise if this layout does not fit the model's experts or the launched world (in this
        order: --ep 3 of 8 experts is the mistake to name, whatever the world size)."""
        if num_experts is not None and num_experts % self.ep:
            raise ValueError(f"ep={self.ep} is invalid: must divide num_experts={num_experts}")
        if world_size is not None and self.world_size != world_size:
            raise ValueError(f"dp_replicate*dp_shard*ep={self.world_size} is invalid: must equal "
                             f"the world size {world_size}")


# flags a preset changes from TrainConfig's (tiny-sized) defaults when the command line leaves
# them out: `dropless train --preset medium` trains at the shape it was measured at
PRESET_TRAINING: dict[str, dict] = {
    "medium": dict(batch_size=8, seq_len=2048, lr=1e-3),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run (`dropless train`). The defaults train `tiny` on the embedded stdlib corpus
    in about two minutes on a 2-core CPU."""

    out: str                          # run directory
    preset: str = "tiny"
    data: str | None = None           # None = the interpreter's stdlib .py files
    val_data: str | None = None       # validation text; given, all of data trains
    tokenizer: Literal["bytes", "bpe"] = "bytes"
    vocab: int = 4096                 # BPE vocabulary size (the model's vocab follows the tokenizer)
    steps: int = 900
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0            # max global grad norm; 0 = off
    seed: int = 0
    eval_every: int = 150
    eval_batches: int = 8
    ckpt_every: int = 300
    log_every: int = 10
    device: str = "auto"              # "auto" = cuda when available, else cpu
    backend: Backend = "auto"
    # auto = bf16-mixed on CUDA, fp32 on CPU; what each one means: dropless.precision
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    compile: bool | None = None       # None = on for one CUDA process (precision.resolve_compile)
    cache_dir: str | None = None      # token cache; None = $XDG_CACHE_HOME/dropless/tokens
    sample_tokens: int = 200          # tokens of the sample generated at the end; 0 = none
    # scale-out under torchrun (dropless.parallel): world = dp_replicate * dp_shard * ep
    ep: int = 1                       # expert-parallel degree
    dp_shard: int = 0                 # FSDP degree; 0 = world / (dp_replicate * ep)
    dp_replicate: int = 1             # HSDP replicas
    # a run or Hugging Face directory whose weights and tokenizer the run starts from (fine-tuning,
    # dropless.finetune); preset, tokenizer and vocab then do not apply
    init: str | None = None
    # the loss covers only the assistant turns of the conversations in data (dropless.conversations)
    assistant_only_loss: bool = False

    def __post_init__(self):
        _choice("preset", self.preset, tuple(PRESETS))
        _check(self.preset not in SHAPE_PRESETS, "preset", self.preset, "it is a public model's "
               "shape for `dropless info` and benchmarks only; trainable: "
               f"{', '.join(p for p in PRESETS if p not in SHAPE_PRESETS)}")
        _check_choices(self)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches",
                     "ckpt_every", "log_every", "ep", "dp_replicate"):
            _int_in(name, getattr(self, name))
        _int_in("vocab", self.vocab, high=LIMITS["vocab"])
        _int_in("seq_len", self.seq_len, high=LIMITS["positions"])
        for name in ("warmup", "sample_tokens", "dp_shard"):
            _int_in(name, getattr(self, name), 0)
        _int_in("seed", self.seed, 0, 2**64 - 1)   # torch.manual_seed's range
        # a run's train_config comes from strangers too (`dropless eval` sizes its windows by it)
        for name, tokens in (("batch_size*seq_len", self.batch_size * self.seq_len),
                             ("batch_size*seq_len*grad_accum",
                              self.batch_size * self.seq_len * self.grad_accum),
                             ("eval_batches*batch_size*seq_len",
                              self.eval_batches * self.batch_size * self.seq_len)):
            _check(tokens <= LIMITS["tokens"], name, tokens,
                   f"must be at most {LIMITS['tokens']} tokens")
        _finite("lr", self.lr, positive=True)
        # torch's AdamW passes its first step, lr / (1 - beta1) = 10 lr, as a float32: past ~3e37
        # that step raised an overflow RuntimeError mid-run, a traceback
        _check(self.lr <= 1e30, "lr", self.lr, "must be a finite number in (0, 1e30]")
        _check(self.compile in (None, True, False), "compile", self.compile,
               "must be true, false or null (auto)")
        _check(self.assistant_only_loss in (True, False), "assistant_only_loss",
               self.assistant_only_loss, "must be true or false")
        for name in ("min_lr_ratio", "weight_decay", "grad_clip"):
            _finite(name, getattr(self, name), positive=False)
        _check(self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        for name in ("out", "data", "val_data", "cache_dir", "init"):   # "": the working dir
            _check(getattr(self, name) != "", name, "", "must name a path (or be left out)")
