"""Model size and cost accounting for `dropless info`: built on the meta device, never allocated.

Conventions: active parameters are what one token uses (every weight except the routed experts it
does not pick; the embedding row lookup counts as a parameter but not as FLOPs). Training FLOPs per
token = 6 * (active matmul parameters, LM head included) + attention 12 * layers * heads * head_dim *
seq_len (QK^T and AV over the full context, forward + backward). A decode step at batch 1 reads
`step_params`: the active ones, of an untied embedding table only the one row.
"""

from __future__ import annotations

import torch

from dropless.config import ModelConfig
from dropless.model import Transformer


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    seq_len = seq_len or cfg.max_seq_len
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    moe = cfg.moe
    per_expert = 3 * cfg.dim * moe.hidden_dim
    num_moe = cfg.num_layers - cfg.first_dense_layers
    active = total - num_moe * (moe.num_experts - moe.top_k) * per_expert
    embedding = cfg.vocab_size * cfg.dim
    # the LM head is a matmul (counted once more when tied to the embedding); the lookup is not
    matmul = active - embedding + (embedding if cfg.tie_embeddings else 0)
    if cfg.attention == "mla":
        qk_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk_dim = v_dim = cfg.head_size
    attn_flops = 6 * cfg.num_layers * cfg.num_heads * (qk_dim + v_dim) * seq_len
    return {
        "total_params": total,
        "active_params": active,
        "step_params": active if cfg.tie_embeddings else active - embedding + cfg.dim,
        "train_flops_per_token": 6 * matmul + attn_flops,
        "seq_len": seq_len,
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_stats(stats: dict) -> str:
    """`model_stats` as a table, with the memory of the fp32 training state (bytes per parameter:
    4 weights, 4 gradients, 8 AdamW's m and v)."""
    total = stats["total_params"]
    rows = [
        ("total parameters", f"{stats['total_params']:,} ({_human(stats['total_params'])})"),
        ("active parameters per token", f"{stats['active_params']:,} "
                                        f"({_human(stats['active_params'])})"),
        (f"training FLOPs per token (seq {stats['seq_len']})",
         _human(stats["train_flops_per_token"], "FLOP")),
        ("weights fp32 / bf16", f"{_gib(4 * total)} / {_gib(2 * total)}"),
        ("bf16 weights a decode step reads (batch 1)", _gib(2 * stats["step_params"])),
        ("gradients fp32", _gib(4 * total)),
        ("Adam state fp32 (m, v)", _gib(8 * total)),
        ("weights + grads + Adam", _gib(16 * total)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def preset_table(presets: dict[str, ModelConfig], seq_len: int | None = None) -> str:
    """One line per preset: shape, parameters and training FLOPs per token, side by side (each at
    its own max_seq_len unless `seq_len` is given; `dropless train` swaps in the tokenizer's
    vocab)."""
    header = ("preset", "layers", "dim", "FFN", "vocab", "total params", "active params",
              "train FLOPs/token", "seq")
    rows = [header]
    base = [n for n in presets if not n.endswith(("-dense", "-2x"))]   # each followed by its partners
    order = sorted(presets, key=lambda n: base.index(n.removesuffix("-dense").removesuffix("-2x")))
    for name in order:
        cfg = presets[name]
        stats = model_stats(cfg, seq_len)
        moe = cfg.moe
        if cfg.first_dense_layers == cfg.num_layers:
            ffn = f"dense {cfg.dense_hidden}"
        else:
            ffn = f"{moe.num_experts} x {moe.hidden_dim}, top-{moe.top_k}"
            if cfg.first_dense_layers:
                ffn += f" ({cfg.first_dense_layers} dense)"
        rows.append((name, str(cfg.num_layers), str(cfg.dim), ffn, str(cfg.vocab_size),
                     _human(stats["total_params"]), _human(stats["active_params"]),
                     _human(stats["train_flops_per_token"], "FLOP"), str(stats["seq_len"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)
