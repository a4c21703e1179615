"""Training throughput: dropless's own training step against Hugging Face transformers, one run.

The model is the `medium` preset (Qwen3-MoE-like: 12 layers, dim 1024, 16 heads / 4 KV heads of 64,
qk-norm, 64 experts of hidden 512, top-8, vocab 32768; 1.31 B parameters, 0.22 B active), trained on
random tokens at seq 2048 x batch 8, fused AdamW, in two precision regimes for both libraries:
pure bf16 weights, and bf16 autocast over fp32 weights (dropless's `bf16-mixed`, the default of
`dropless train` on a GPU). dropless runs `dropless.train.train_step`, the very step of `dropless
train` (losses, clipping, AdamW, bias update), eager and under torch.compile.

FLOPs per token (dropless.info.model_stats): 6 x active matmul parameters (LM head included) +
attention 12 x layers x heads x head_dim x seq (QK^T and AV, forward + backward, full context).
MFU divides the achieved FLOP/s by the GPU's dense bf16 peak (989 TFLOP/s on an H100 / H200).

    python benchmarks/train.py [--steps 10] [--json out.json]
    python benchmarks/train.py --backends grouped,grouped_lowmem \
        --providers "dropless bf16-mixed compiled,dropless bf16-mixed eager"   # experts A/B

With --backends, each dropless row runs once per expert backend, alternating, named with the
backend in brackets; --providers names the rows without it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import traceback
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dropless.config import PRESETS, TrainConfig
from dropless.info import model_stats
from dropless.model import Transformer
from dropless.optim import make_optimizer
from dropless.parallel.runtime import Runtime
from dropless.precision import autocast_for, bf16_peak_flops
from dropless.train import lm_loss, train_step

SEQ, BATCH = 2048, 8


def time_steps(step, steps: int, warmup: int) -> tuple[float, float]:
    """Median step milliseconds and peak GiB. The steps run back to back as a training loop runs
    them (no host sync between steps, so the host launches step n+1 while the GPU runs step n);
    a CUDA event at each step's start, read after the last one, times the interval between
    consecutive starts: the GPU's time per step, or the host's where it cannot keep up. (Rounds
    4-6 synchronized after every step, which also counted the host's launch latency at each
    step's start: 104 vs 89 ms for the compiled bf16-mixed step in round 6.)"""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    for i in range(steps):
        events[i].record()
        step()
    events[steps].record()
    events[steps].synchronize()
    times = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def dropless_provider(cfg, precision: str, compiled: bool, tokens_BT):
    device = tokens_BT.device
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    if precision == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    tcfg = TrainConfig(out="unused", preset="medium", precision=precision)
    opt = make_optimizer(model, tcfg, working_copies=precision == "bf16-mixed")
    loss_fn = torch.compile(lm_loss) if compiled else lm_loss
    amp = autocast_for(precision, device)
    rt = Runtime(device=device)
    L, E = len(model.moe_layers()), cfg.moe.num_experts
    batches = [(tokens_BT[:, :-1].contiguous(), tokens_BT[:, 1:].contiguous())]

    def step():
        train_step(model, loss_fn, opt, batches, amp, tcfg, rt, L, E)
    return step


def hf_provider(cfg, precision: str, tokens_BT, cudnn_attention: bool = False):
    """HF's step; `cudnn_attention`: its SDPA calls run cuDNN's kernel, as dropless's do, so
    that the comparison also holds with the attention kernel taken out of it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf_cfg = Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=4 * cfg.dim,
        moe_intermediate_size=cfg.moe.hidden_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_size, num_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, output_router_logits=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = Qwen3MoeForCausalLM(hf_cfg).to(tokens_BT.device, dtype)
    model.config._attn_implementation = "sdpa"
    model.set_experts_implementation("grouped_mm")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    amp = torch.autocast("cuda", torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    order = (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)) if cudnn_attention else nullcontext

    def step():
        with amp, order():
            logits = model(input_ids=tokens_BT[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens_BT[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile(step, warmup: int) -> None:
    """Top GPU kernels per step, then the host side: wall time per step with no sync between
    steps (against GPU time it says whether the step is launch-bound), the host ops that took the
    most CPU time, and the calls that wait for the GPU (syncs stall the launch queue)."""
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile as torch_profile

    counters.clear()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # the kernels themselves: a CPU op's self device time repeats its kernels' (round 7's first
    # host-side profile counted them twice)
    events = [e for e in averages if e.self_device_time_total > 0
              and e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events)
    print(f"GPU time per step: {total_us / 3e3:.1f} ms over {sum(e.count for e in events) // 3} "
          "kernels")
    print("| ms per step | share | calls per step | kernel |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:45]:
        print(f"| {e.self_device_time_total / 3e3:.2f} | {e.self_device_time_total / total_us:.1%} "
              f"| {e.count // 3} | {e.key[:110]} |")
    wall_ms, _ = time_steps(step, 10, 0)
    print(f"\nwall time per step, median of 10 back to back (as the table times them): "
          f"{wall_ms:.1f} ms (GPU busy {total_us / 3e3:.1f} ms)")
    waits = [e for e in averages if any(w in e.key for w in (
        "Synchronize", "_local_scalar_dense", "cudaMemcpy", "nonzero", "EventSynchronize"))]
    print("host calls that may wait for the GPU, per step: " + (", ".join(
        f"{e.key} x{e.count / 3:g} ({e.cpu_time_total / 3e3:.2f} ms)" for e in waits) or "none"))
    breaks = sum(counters["graph_break"].values())
    print(f"torch.compile: {counters['stats']['unique_graphs']} graphs, {breaks} graph breaks"
          + "".join(f"\n  break: {k[:160]} x{v}" for k, v in counters["graph_break"].items()))
    host = sorted((e for e in averages if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:20]
    print("| host ms per step (self) | calls per step | op |")
    print("|---|---|---|")
    for e in host:
        print(f"| {e.self_cpu_time_total / 3e3:.2f} | {e.count / 3:g} | {e.key[:100]} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--providers", default="all",
                        help="comma-separated subset of the table's rows, or all")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated MoE expert backends for the dropless rows "
                             "(default auto)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", metavar="PROVIDER",
                        help="instead of the table: where each of these providers' steps (comma-"
                             "separated) spends its GPU time (torch.profiler, top kernels)")
    parser.add_argument("--graph-breaks", action="store_true",
                        help="A/B: break the compiled graph once per MoE layer where round 6's "
                             "build did (a device query the compiler cannot trace), to compare "
                             "with the one-graph step of the same tree")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train.py needs a CUDA GPU")
    if args.graph_breaks:
        from dropless.ops import grouped
        grouped.cuda_capability_major = torch.compiler.disable(
            lambda index: torch.cuda.get_device_capability(index)[0])
        print("graph breaks: one per MoE layer (the capability query is not traced)")
    device = torch.device("cuda")
    cfg = replace(PRESETS["medium"], max_seq_len=SEQ)
    stats = model_stats(cfg, SEQ)
    flops_per_token = stats["train_flops_per_token"]
    peak = bf16_peak_flops(device)
    tokens_BT = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), device=device)
    providers = {
        "hf bf16": lambda: hf_provider(cfg, "bf16", tokens_BT),
        "hf bf16-mixed": lambda: hf_provider(cfg, "bf16-mixed", tokens_BT),
        "hf bf16 cudnn-attention": lambda: hf_provider(cfg, "bf16", tokens_BT, cudnn_attention=True),
    }
    backends = args.backends.split(",")
    for precision, compiled in (("bf16-mixed", False), ("bf16-mixed", True), ("bf16", False),
                                ("bf16", True)):
        for backend in backends:   # each row's backends next to each other: an A/B, alternating
            name = f"dropless {precision} {'compiled' if compiled else 'eager'}"
            named = name if backends == ["auto"] else f"{name} [{backend}]"
            with_backend = replace(cfg, moe=replace(cfg.moe, backend=backend))
            providers[named] = (lambda c=with_backend, p=precision, k=compiled:
                                dropless_provider(c, p, k, tokens_BT))
    if args.profile:
        for name in args.profile.split(","):
            print(f"\n## {name}")
            profile(providers[name](), args.warmup)
            gc.collect()
            torch.cuda.empty_cache()
        return 0
    wanted = list(providers) if args.providers == "all" else [
        name for name in providers if name.split(" [")[0] in args.providers.split(",")]
    import transformers
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "seq": SEQ, "batch": BATCH,
               "total_params": stats["total_params"], "active_params": stats["active_params"],
               "flops_per_token": flops_per_token, "peak_flops": peak, "rows": {}}
    for name in wanted:
        try:
            ms, gib = time_steps(providers[name](), args.steps, args.warmup)
            tps = BATCH * SEQ / (ms / 1e3)
            results["rows"][name] = {"step_ms": ms, "tokens_per_s": tps,
                                     "tflops": tps * flops_per_token / 1e12,
                                     "mfu": tps * flops_per_token / peak if peak else None,
                                     "peak_gib": gib}
        except Exception:   # a provider that fails is reported, the others still run
            results["rows"][name] = {"error": traceback.format_exc()[-2000:]}
            traceback.print_exc()
        print(name, results["rows"][name], flush=True)
        gc.collect()
        torch.cuda.empty_cache()

    rows = results["rows"]
    hf_best = max((r["tokens_per_s"] for n, r in rows.items() if n.startswith("hf") and
                   "tokens_per_s" in r), default=None)
    print(f"\n{results['gpu']}, torch {results['torch']}, transformers "
          f"{results['transformers']}; medium preset ({stats['total_params'] / 1e9:.2f} B params, "
          f"{stats['active_params'] / 1e9:.2f} B active), seq {SEQ} x batch {BATCH}; "
          f"{flops_per_token / 1e9:.2f} GFLOP per token")
    print("| provider | step ms | tokens/s | TFLOP/s | MFU | peak GiB | vs HF best |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / hf_best:.2f}" if hf_best else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        print(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{mfu} | {r['peak_gib']:.1f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
