"""Kernels (CUDA) or aten ops (CPU) of one engine decode step, per layer, for a preset.

    python benchmarks/decode_kernels.py --preset medium                 # H200: eager and compiled
    python benchmarks/decode_kernels.py --preset tiny --device cpu      # aten ops, eager
    python benchmarks/decode_kernels.py --preset medium --prefill 1 32  # host time of a prefill
    python benchmarks/decode_kernels.py --preset qwen3-30b-a3b --int4 --batches 1  # int4 step

One step = `Engine._decode(b, greedy=True)` on random weights (bf16 on CUDA, fp32 on the CPU), run
outside a CUDA graph so that each launch is seen; `--int4`: the experts and attention projections
rounded to int4 (quantize_rtn: the kernels' speed does not depend on the values); bf16 experts
are laid out k-major on CUDA, as `dropless serve` loads them. Per layer =
count(2 layers) - count(1 layer) of the preset cut to that depth (the first layer kept MoE), so
the embedding, LM head, argmax and buffer updates fall out; "rest" is what the step spends
outside the layers. On the CPU the count is of aten ops that touch data (views, reshapes and
allocations excluded: they launch nothing), a proxy for CUDA kernels; torch.compile is counted on
CUDA only (its CPU kernels are not aten ops). On CUDA each row also lists the GPU time per layer
by kernel, from the same profiled step (kernel durations only: the gaps between launches, which a
CUDA graph shrinks, are not in it).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dropless import Transformer, get_preset
from dropless.quant.modules import QuantConfig, quantize_rtn
from dropless.serve import Engine, moe_decode

# aten ops that only make views or allocate: no kernel
FREE = {"view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute",
        "slice", "select", "as_strided", "alias", "detach", "empty", "empty_strided", "reshape",
        "split", "split_with_sizes", "chunk", "unbind", "lift_fresh", "_reshape_alias",
        "view_as_real", "view_as_complex", "unfold", "diagonal", "narrow", "promote_types"}


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def build(cfg, device, dtype, int4=False):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    if int4:
        return quantize_rtn(model, QuantConfig())
    moe_decode.kmajor_experts(model)   # as `dropless serve` and `generate` load a model
    return model


def count_step(cfg, device, dtype, batch: int, compile: bool, int4: bool = False
               ) -> tuple[int, Counter, Counter | None]:
    """(kernels or aten ops, their counts by name, on CUDA their GPU microseconds by name)."""
    model = build(cfg, device, dtype, int4)
    engine = Engine(model, max_batch=batch, max_len=min(cfg.max_seq_len, 256), buckets=(batch,),
                    cuda_graphs=False, compile=compile)
    engine.positions_B.copy_(torch.arange(batch) * 7 + 5)   # rows at different positions
    with torch.no_grad():
        for _ in range(3):   # warm-up: Triton autotuning, compilation
            engine.decode_fn(batch, True)
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.decode_fn(batch, True)
                torch.cuda.synchronize()
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels, us = Counter(e.name[:60] for e in events), Counter()
            for e in events:
                us[e.name[:60]] += e.device_time
            return sum(kernels.values()), kernels, us
        mode = AtenOps()
        with mode:
            engine.decode_fn(batch, True)
        return sum(mode.ops.values()), mode.ops, None


def profile_prefill(cfg, device, dtype, n: int, prompt: int, top: int) -> None:
    """Wall time (median of 5) of the engine step that admits and prefills n prompts of `prompt`
    tokens (and launches the first decode step), then a profile of one: host ops by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from dropless.serve import Request, SamplingParams
    model = build(cfg, device, dtype)
    engine = Engine(model, max_batch=n, max_len=prompt + 8)
    engine.warm_up()
    g = torch.Generator().manual_seed(n)

    def submit():
        for _ in range(n):
            ids = torch.randint(0, cfg.vocab_size, (prompt,), generator=g).tolist()
            engine.submit(Request(ids, SamplingParams(max_tokens=2, temperature=0)))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for rep in range(7):   # two warm-ups
        submit()
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        engine.run_until_done()
    print(f"prefill step of {n} x {prompt} tokens: {sorted(times[2:])[2]:.1f} ms wall (median of "
          f"5; warm-ups {times[0]:.0f}, {times[1]:.0f} ms)")
    submit()
    sync()
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        engine.step()
        sync()
    engine.run_until_done()
    gpu_us = sum(e.device_time for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"  kernels: {gpu_us / 1e3:.1f} ms of GPU time; host ops by CPU time (self):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key[:60]:60} {e.count:6} calls {e.self_cpu_time_total / 1e3:8.2f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the "
                    "CPU (bf16 there shows the casts a GPU step launches)")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent per layer")
    ap.add_argument("--prefill", type=int, nargs="+", metavar="N",
                    help="instead: profile the engine step that prefills N prompts")
    ap.add_argument("--prompt", type=int, default=32, help="--prefill's prompt tokens")
    ap.add_argument("--int4", action="store_true", help="int4 experts and attention projections")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    base = get_preset(args.preset)
    if args.prefill:
        for n in args.prefill:
            profile_prefill(base, device, dtype, n, args.prompt, args.top or 25)
        return
    cut = {n: dataclasses.replace(base, num_layers=n, first_dense_layers=min(
        base.first_dense_layers, n - 1)) for n in (1, 2)}
    unit = "kernels" if device.type == "cuda" else "aten ops"
    modes = [False, True] if device.type == "cuda" else [False]
    print(f"{args.preset}{' int4' if args.int4 else ''}: {unit} per decode step on "
          f"{device.type} ({dtype}), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'':16}{'batch':>6}{'per layer':>11}{'rest':>7}{f'{base.num_layers} layers':>12}")
    for compile in modes:
        for b in args.batches:
            (n1, c1, us1), (n2, c2, us2) = (count_step(cut[n], device, dtype, b, compile,
                                                       args.int4) for n in (1, 2))
            per_layer = n2 - n1
            name = "compiled" if compile else "eager"
            print(f"{name:16}{b:6}{per_layer:11}{n1 - per_layer:7}"
                  f"{n1 - per_layer + base.num_layers * per_layer:12}", flush=True)
            if args.top:
                diff = c2 - c1
                print("    " + ", ".join(f"{k} {v}" for k, v in diff.most_common(args.top)))
            if us1 is not None:   # GPU time per layer by kernel (one profiled step, no graph)
                per = {k: us2[k] - us1.get(k, 0.0) for k in us2}
                print(f"    GPU us per layer {sum(per.values()):.1f}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                    if abs(v) >= 0.05))


if __name__ == "__main__":
    main()
