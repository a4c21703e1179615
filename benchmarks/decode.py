"""Decode speed, side by side in one run: the dropless engine, `dropless.generate.generate`, Hugging
Face `generate` on the same weights, and `dropless serve` under concurrent streaming clients.

    python benchmarks/decode.py --json decode.json                       # medium preset, H200
    python benchmarks/decode.py --preset qwen3-30b-a3b --batches 1 --no-hf --no-server
    python benchmarks/decode.py --preset tiny --device cpu --new 16 --clients 1 4   # smoke test

Greedy decoding of random prompts (`--prompt` tokens, `--new` new tokens) on random bf16 weights
built directly on the device. tokens/s counts new tokens over the whole call (prefill included;
short prompts prefill through the decode step's path, "engine_blocks_prefill" through the model's
blocks, round 12's way); with `--context N` every slot's cache holds N positions, as a server's
does, and "engine_one_length" reads all N every step (no context buckets); "engine_no_kernels"
(GPU) decodes with SDPA and the router's torch ops instead of the attention and router kernels,
"engine_no_linear" with rms_norm + F.linear and addmm instead of the projections' GEMV kernel,
"engine_training_layout" with the experts' weights in the training layout (contiguous), not the
k-major layout serve and generate lay them out in (moe_decode.kmajor_experts);
"ms/step" is the median of one CUDA-graph decode step of the whole batch, timed alone. The floor is
one read of the weights a step reads: step params (the active ones, of an untied embedding table one
row; before round 30 the whole table, 10% more at the Qwen3-30B-A3B shape) x 2 bytes over this
device's bandwidth, measured in the run as a copy of 1 GiB (bytes read and written over its median
time; 4.24 TB/s on an H200; the floor used a fixed 4.24 TB/s before round 23, also on H100s).
The server runs in a subprocess (so clients and server share no GIL) on the same seeded weights;
clients stream token-id prompts from /v1/completions: a warm-up round, then `--server-rounds`
timed rounds per client count (the median round by tokens/s is reported, each round's time to
first token and prefill time beside it); the server's stderr is printed when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from dropless import Transformer, get_preset
from dropless.experts import Experts
from dropless.info import model_stats
from dropless.serve import Engine, Request, SamplingParams, moe_decode
from dropless.serve import decode as serve_decode
from moe_layer import bench   # the benchmarks' one timing helper (this script's folder)
from serve_clients import (engine_counters, health, httpx_module, start_server, stop_server,
                           stream_round)

def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (64 MiB on a CPU): twice its bytes (read and
    written) over the median time (moe_layer.bench: warm-up, CUDA events)."""
    size = 1 << (30 if torch.device(device).type == "cuda" else 26)
    src = torch.ones(size, dtype=torch.uint8, device=device)   # not timed on untouched pages
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), torch.device(device))
    return 2 * src.numel() / (ms * 1e-3)


def build(preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights made on the device in `dtype` (a 30 B model never exists in fp32)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(get_preset(preset))
    finally:
        torch.set_default_dtype(default)
    moe_decode.kmajor_experts(model)   # as `dropless serve` and `generate` load a model
    return model.eval()


def training_layout(model: Transformer, on: bool) -> None:
    """The experts' weights contiguous (the training layout: the engine's A/B), or k-major again."""
    if not on:
        moe_decode.kmajor_experts(model)
        return
    for m in model.modules():
        if isinstance(m, Experts):
            for p in (m.gate_up, m.down):
                p.data = p.data.contiguous()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def time_engine(engine: Engine, prompts, new: int, device, reps: int = 3) -> float:
    """Median seconds to generate `new` tokens for every prompt (greedy), prefill included."""
    def once(n):
        reqs = [engine.submit(Request(p, SamplingParams(max_tokens=n, temperature=0)))
                for p in prompts]
        engine.run_until_done()
        assert all(len(r.output) == n for r in reqs)
    once(4)   # captures the decode graph
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        once(new)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_ms(engine: Engine, batch: int) -> float:
    """Median ms of one decode step of `batch` rows (the captured graph on CUDA)."""
    fn = (lambda: engine._run_decode(batch, True))
    fn()
    return bench(fn, engine.device)


def run_hf(model: Transformer, prompts_by_batch: dict, new: int, device, dtype) -> dict:
    """HF generate on the same weights (dropless.hf.to_hf -> from_pretrained); also how many
    of the first new tokens agree with dropless greedy (bf16 rounding may split them later)."""
    from transformers import AutoModelForCausalLM

    from dropless.hf import to_hf

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    if torch.device(device).type == "cuda":
        try:
            hf.set_experts_implementation("grouped_mm")
        except Exception as e:   # older transformers: its default experts loop
            print(f"hf: grouped_mm experts unavailable ({e})", file=sys.stderr)
    for batch, prompts in prompts_by_batch.items():
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            sync(device)
            start = time.perf_counter()
            gen = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sync(device)
        dt = time.perf_counter() - start
        out[batch] = {"tokens_per_s": batch * new / dt, "ms_per_step": dt / new * 1e3,
                      "first_tokens": gen[0, len(prompts[0]):len(prompts[0]) + 8].tolist()}
    del hf
    return out


def time_generate(model, prompts, new, device) -> dict:
    from dropless.generate import generate

    generate(model, prompts, new, temperature=0)   # same shape next: reuses the engine's graph
    sync(device)
    start = time.perf_counter()
    generate(model, prompts, new, temperature=0)
    sync(device)
    return {"tokens_per_s": len(prompts) * new / (time.perf_counter() - start)}


def guarded(fn):
    """fn(), or {"error": ...}: one failing provider must not cost the others' numbers."""
    try:
        return fn()
    except Exception as e:
        import traceback
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:1000]}


# ---- the server -----------------------------------------------------------------------------

def serve_main(args) -> None:
    """Subprocess: the same seeded weights behind `dropless serve`'s app, with a word-level
    tokenizer of the model's vocabulary (token i <-> "t{i}")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dropless.serve.server import serve
    from dropless.serve.text import DEFAULT_CHAT_TEMPLATE, ServedModel
    from dropless.tokenizer import BPETokenizer

    model = build(args.preset, args.device, torch.bfloat16 if args.device != "cpu" else torch.float32)
    vocab = model.cfg.vocab_size
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    served = ServedModel("bench", model, BPETokenizer(tok), (), DEFAULT_CHAT_TEMPLATE, {})
    engine = Engine(model, max_batch=args.max_batch, max_len=args.prompt + args.new,
                    admit_delay=args.admit_delay_ms[0] / 1e3,
                    compile_prefill=args.serve_compile_prefill)
    if args.ungated:   # the event loop no longer waits out the prefills (serve/loop.py)
        engine.gate = nullcontext()
    serve(served, engine, "127.0.0.1", args.serve_port)


def run_server(args, vocab, delay_ms: float, ungated: bool = False) -> dict:
    proc, port = start_server(__file__, [
        "--preset", args.preset, "--device", args.device, "--max-batch", str(max(args.clients)),
        "--prompt", str(args.prompt), "--new", str(args.new), "--admit-delay-ms", str(delay_ms)] +
        ["--serve-compile-prefill"] * args.serve_compile_prefill + ["--ungated"] * ungated)
    try:
        httpx = httpx_module()
        out = {}
        for n in args.clients:
            prompts = prompts_for(n, args.prompt, vocab, seed=n)
            asyncio.run(stream_round(port, prompts, 8))   # warm-up
            rounds = []
            for _ in range(args.server_rounds):   # a one-off cost (a first shape) shows as spread
                before = engine_counters(httpx, port)
                r = asyncio.run(stream_round(port, prompts, args.new))
                after = engine_counters(httpx, port)   # what the engine did in this round
                rounds.append({**r, **{k: after.get(k, 0) - before.get(k, 0) for k in after}})
            out[n] = {**sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2],
                      "admit_delay_ms": delay_ms, "prefill": health(httpx, port)["prefill"],
                      "rounds": [{k: r[k] for k in ("tokens_per_s", "ttft_ms", "prefills",
                                                    "prefill_rows", "prefill_s") if k in r}
                                 for r in rounds]}
            print(f"server {n} clients, admit delay {delay_ms} ms: {out[n]}", flush=True)
        return out
    finally:   # what the server said (warnings, recompilations under TORCH_LOGS=recompiles)
        print("server stderr, last lines:\n" + stop_server(proc), flush=True)


# ---- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--context", type=int, help="the engine's cache length (default prompt + new)")
    ap.add_argument("--prefill-step-tokens", type=int, nargs="+", default=[],
                    help="also time the engine with these prefill_step_tokens (e.g. 1024: a "
                         "batch-32 prompt through the decode step's path), as engine_stepN")
    ap.add_argument("--compile", action="store_true",
                    help="also time the engine with torch.compile'd decode steps")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--admit-delay-ms", type=float, nargs="+", default=[0.0],
                    help="the server engine's admit_delay; several: one server each, side by side")
    ap.add_argument("--server-rounds", type=int, default=3,
                    help="timed rounds per client count; the median round (tokens/s) is reported, "
                         "each round's TTFT and prefill time beside it")
    ap.add_argument("--ungated", action="store_true",
                    help="also time a server whose event loop does not wait out the engine's "
                         "prefills (dropless/serve/loop.py), as server_N_clients_ungated")
    ap.add_argument("--serve-compile-prefill", action="store_true",
                    help="the server's engine compiles its prefill forward (and the engine is "
                         "also timed so, as engine_prefill_compiled: the server's baseline)")
    args = ap.parse_args()
    if args.serve_port:
        return serve_main(args)

    device = args.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    cfg = get_preset(args.preset)
    stats = model_stats(cfg)
    bandwidth = copy_bandwidth(device)
    floor_ms = stats["step_params"] * 2 / bandwidth * 1e3
    res = {"preset": args.preset, "device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "prompt": args.prompt, "new": args.new, "active_params": stats["active_params"],
           "step_params": stats["step_params"],
           "floor_ms_per_step_bs1": floor_ms, "copy_bandwidth": bandwidth,
           "compile": args.compile,
           "context": args.context or args.prompt + args.new}
    model = build(args.preset, device, dtype)
    prompts = {b: prompts_for(b, args.prompt, cfg.vocab_size, seed=b) for b in args.batches}
    variants = [("engine", {})] + [("engine_compiled", {"compile": True})] * args.compile + [
        ("engine_prefill_compiled", {"compile_prefill": True})] * args.serve_compile_prefill + [
        ("engine_blocks_prefill", {"prefill_step_tokens": 0})] + [
        ("engine_one_length", {"lengths": (args.context,)})] * bool(args.context) + [
        (f"engine_step{n}", {"prefill_step_tokens": n}) for n in args.prefill_step_tokens]
    max_len, step_tokens = args.context or args.prompt + args.new, 0
    if device != "cpu":   # the decode MoE path of few rows, without the Triton GEMVs; the step
        # without the attention and router kernels (SDPA and the router's torch ops); without
        # the projections' GEMV kernel (rms_norm + F.linear, addmm)
        variants += [("engine_training_layout", {"training_layout": True}),
                     ("engine_gather", {"moe_path": "gather"}),
                     ("engine_no_kernels", {"decode_kernels": False}),
                     ("engine_no_linear", {"linear_kernel": False})]
    for b in args.batches:
        for name, kw in variants:
            if name == "engine_gather" and b != 1 or name == "engine_blocks_prefill" and (
                    b * args.prompt > step_tokens):
                continue   # blocks: the same prefill path as "engine" (prompts over step_tokens)
            gates = (serve_decode.fused_attention, moe_decode.fused_router,
                     serve_decode.fused_linear)
            if kw.get("decode_kernels") is False:
                serve_decode.fused_attention = moe_decode.fused_router = lambda t: False
            if kw.get("linear_kernel") is False:
                serve_decode.fused_linear = lambda t: False
            training_layout(model, kw.get("training_layout", False))
            try:
                engine = Engine(model, max_batch=b, max_len=max_len, buckets=(b,), **{
                    k: v for k, v in kw.items() if k not in ("decode_kernels", "linear_kernel",
                                                             "training_layout")})
                if name == "engine":
                    step_tokens = engine.step_tokens
                dt = time_engine(engine, prompts[b], args.new, device)
                r = {"tokens_per_s": b * args.new / dt, "ms_per_call_step": dt / args.new * 1e3,
                     "ms_per_step": step_ms(engine, b)}
                first = engine.submit(Request(prompts[b][0], SamplingParams(
                    max_tokens=min(8, args.new), temperature=0)))   # the cache holds prompt + new
                engine.run_until_done()
                r["first_tokens"] = first.output
            except Exception as e:   # e.g. torch.compile failing on this stack: keep the rest
                import traceback
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {e}"[:1000]}
            (serve_decode.fused_attention, moe_decode.fused_router,
             serve_decode.fused_linear) = gates
            res[f"{name}_bs{b}"] = r
            print(f"{name} bs{b}: {r}", flush=True)
            engine = None   # frees its KV cache and graphs
        res[f"generate_bs{b}"] = guarded(lambda: time_generate(model, prompts[b], args.new, device))
        print(f"generate() bs{b}: {res[f'generate_bs{b}']}", flush=True)
    if not args.no_hf:
        hf = guarded(lambda: run_hf(model, prompts, args.new, device, dtype))
        for b in args.batches:
            r = hf.get(b, hf)
            ours = res.get(f"engine_bs{b}", {}).get("first_tokens", [])
            if "first_tokens" in r:   # same weights: same greedy tokens, up to bf16 near-ties
                r["leading_tokens_equal_to_engine"] = next(
                    (i for i, (a, c) in enumerate(zip(ours, r["first_tokens"])) if a != c),
                    min(len(ours), len(r["first_tokens"])))
            res[f"hf_bs{b}"] = r
            print(f"hf bs{b}: {r}", flush=True)
    # the weights freed for the server's own copy (not `del`: the lambdas above read `model`,
    # which pyflakes then took for an undefined name)
    model = None
    if device != "cpu":
        torch.cuda.empty_cache()
    if not args.no_server:
        servers = [(d, False) for d in args.admit_delay_ms] + [
            (args.admit_delay_ms[0], True)] * args.ungated
        for i, (delay, ungated) in enumerate(servers):
            served = guarded(lambda: run_server(args, cfg.vocab_size, delay, ungated))
            suffix = "_ungated" if ungated else f"_delay{delay:g}ms" if i else ""
            for n in args.clients:   # the first delay's rows are the table's server rows
                res[f"server_{n}_clients{suffix}"] = served.get(n, served)
    print_table(res, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


def print_table(res: dict, args) -> None:
    print(f"\n{res['preset']} on {res['device']}, torch {res['torch']}, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy; floor {res['floor_ms_per_step_bs1']:.3f} ms/step at bs1 "
          f"(copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s)")
    print(f"{'':32}{'tokens/s':>12}{'ms/step':>10}{'x floor':>9}{'x HF':>8}")
    for b in args.batches:
        hf = res.get(f"hf_bs{b}", {}).get("tokens_per_s")
        for name in [f"{v}_bs{b}" for v in ("engine", "engine_compiled", "engine_prefill_compiled",
                                            "engine_blocks_prefill", "engine_one_length",
                                            *(f"engine_step{n}" for n in args.prefill_step_tokens),
                                            "engine_training_layout", "engine_gather",
                                            "engine_no_kernels", "engine_no_linear",
                                            "generate", "hf")]:
            if "tokens_per_s" not in res.get(name, {}):
                continue
            r = res[name]
            ms = r.get("ms_per_step", float("nan"))
            ratio = f"{r['tokens_per_s'] / hf:8.1f}" if hf else f"{'':8}"
            floor = ms / res["floor_ms_per_step_bs1"] if b == 1 else float("nan")
            print(f"{name:32}{r['tokens_per_s']:12,.0f}{ms:10.3f}{floor:9.1f}{ratio}")
    for key in [k for k in res if k.startswith("server_") and "tokens_per_s" in res[k]]:
        r = res[key]
        print(f"{key:32}{r['tokens_per_s']:12,.0f}   TTFT {r['ttft_ms']:.1f} ms, "
              f"inter-token {r['itl_ms']:.2f} ms, {r.get('prefills', 0)} prefill forwards "
              f"({r.get('prefill', '?')}), "
              f"{r.get('captures', 0)} graph captures")
        if len(r.get("rounds", [])) > 1:   # a slow round's prefill: a one-off cost or steady
            print(f"{'':32}rounds: " + ", ".join(
                f"TTFT {x['ttft_ms']:.1f} ms (prefill {x.get('prefill_s', 0) * 1e3:.1f} ms in "
                f"{x.get('prefills', 0)})" for x in r["rounds"]))
    base = "engine_prefill_compiled_bs32" if args.serve_compile_prefill else "engine_bs32"
    for key in [k for k in res if k.startswith("server_32_clients") and "tokens_per_s" in res[k]]:
        if "tokens_per_s" not in res.get(base, {}):
            break
        print(f"{key} / {base}: {res[key]['tokens_per_s'] / res[base]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
