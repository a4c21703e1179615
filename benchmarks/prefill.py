"""The engine's prefill, one forward at a time: where a served request's time to first token goes.

    python benchmarks/prefill.py                                   # medium preset, one GPU
    python benchmarks/prefill.py --preset tiny --device cpu --rows 1 4 --repeats 2   # smoke test

For each row count N, N prompts of `--prompt` tokens go through `Engine._prefill` as one run of
adjacent slots, as the server's engine prefills admitted requests: with the blocks' forward eager
and compiled (`compile_prefill`, dynamic in rows and tokens), and a run short enough for the
decode step's path (N x prompt <= the engine's step tokens) through that path. Each is timed as
the first call's whole time (what a new row count costs once: a compile, a Triton kernel's first
specialization for it), then the host's launch time (until `_prefill` returns) and the whole time
(synchronized), medians of `--repeats` after a second warm-up; compiled also in the last N
slots (its cache rows at an offset, as a second run of admitted requests has them).
Recompilations are logged as they happen. The model's plain forward over the same tokens (no
cache, the training path under no_grad) is timed beside them for scale. Then a kernel table of
one prefill of the most rows, eager and compiled: whether the time is the device's or the
host's. The model is built as decode.py builds it (random bf16 weights, the experts k-major as
`dropless serve` lays them out).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode import build, prompts_for, sync   # this script's folder
from dropless import get_preset
from dropless.serve import Engine, Request, SamplingParams


def prefill(engine: Engine, prompts, first: int = 0) -> tuple[float, float]:
    """(launch s, whole s) of one `_prefill` of these prompts in slots first..first+N-1; the
    slots are emptied again after (no decode step runs)."""
    slots = list(range(first, first + len(prompts)))
    for slot, prompt in zip(slots, prompts):
        request = Request(prompt, SamplingParams(max_tokens=2, temperature=0))
        request.prefilled = 0
        engine.slots[slot] = request
    sync(engine.device)
    start = time.perf_counter()
    with torch.no_grad():   # as Engine.step
        engine._prefill(slots)
    launched = time.perf_counter()
    sync(engine.device)
    done = time.perf_counter()
    engine.slots[first:first + len(slots)] = [None] * len(slots)
    engine.firsts.clear()
    return launched - start, done - start


def median_ms(fn, repeats: int) -> tuple[float, float, float]:
    """(first call's whole ms: one-off costs such as a compile or a Triton kernel's first
    specialization included, then the launch and whole ms: medians after two warm-ups)."""
    first = fn()[1] * 1e3
    fn()
    runs = [fn() for _ in range(repeats)]
    return (first, *(statistics.median(r[i] for r in runs) * 1e3 for i in range(2)))


def forward_ms(model, prompts, repeats: int) -> float:
    tokens = torch.tensor(prompts, device=next(model.parameters()).device)

    def once():
        sync(tokens.device)
        start = time.perf_counter()
        with torch.no_grad():
            model(tokens)
        sync(tokens.device)
        return 0.0, time.perf_counter() - start
    return median_ms(once, repeats)[2]


def kernel_table(engine: Engine, prompts, label: str) -> None:
    cuda = engine.device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    prefill(engine, prompts)
    with torch.profiler.profile(activities=acts) as prof:
        prefill(engine, prompts)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"\n### {label}: one prefill of {len(prompts)} rows, top ops by {key}\n")
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    torch._logging.set_logs(recompiles=True)
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    cfg = get_preset(args.preset)
    model = build(args.preset, args.device, dtype)
    max_batch = max(args.rows)
    engines = {"eager": Engine(model, max_batch=max_batch, max_len=args.prompt + 8),
               "compiled": Engine(model, max_batch=max_batch, max_len=args.prompt + 8,
                                  compile_prefill=True)}
    name = (torch.cuda.get_device_name() if args.device != "cpu" else "cpu")
    print(f"{args.preset} on {name}, torch {torch.__version__}, {dtype}; prompts of "
          f"{args.prompt} tokens; engine step tokens {engines['eager'].step_tokens}; medians of "
          f"{args.repeats}, ms\n")
    print("| rows | tokens | path | eager: first | launch | whole | compiled: first | launch | "
          "whole | compiled, last slots: first | launch | whole | model forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.rows:
        prompts = prompts_for(n, args.prompt, cfg.vocab_size, seed=n)
        short = n * args.prompt <= engines["eager"].step_tokens
        times = [median_ms(lambda: prefill(e, prompts), args.repeats) for e in engines.values()]
        times.append(median_ms(lambda: prefill(engines["compiled"], prompts, max_batch - n),
                               args.repeats))
        fwd = forward_ms(model, prompts, args.repeats)
        print(f"| {n} | {n * args.prompt} | {'decode step' if short else 'blocks'} | "
              + " | ".join(f"{t:.2f}" for triple in times for t in triple) + f" | {fwd:.2f} |",
              flush=True)
    if not args.no_profile:
        prompts = prompts_for(max_batch, args.prompt, cfg.vocab_size, seed=max_batch)
        for label, engine in engines.items():
            kernel_table(engine, prompts, label)


if __name__ == "__main__":
    main()
