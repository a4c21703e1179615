"""What asking for log-probabilities costs a decode step: the engine's step with and without
them (serve/sampling.top_logprobs: a float32 log-softmax over the vocabulary, the chosen token's
gathered, the 20 most likely), each a CUDA graph on CUDA, alternating, medians (decode.step_ms).
Requests that do not ask run the graph without them, so this is the cost to the batch of a step
where at least one row asks.

    python benchmarks/logprobs.py --preset medium --batches 1 32
    python benchmarks/logprobs.py --device cpu --preset tiny --batches 1 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

from decode import build   # this script's folder
from moe_layer import bench
from dropless.serve.engine import Engine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=256, help="cache positions a step reads")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.preset, args.device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {args.preset}, {name}, torch {torch.__version__}, {dtype}, context "
          f"{args.context}; ms per decode step (median of {args.reps} alternating rounds)")
    print("| batch | without | with logprobs | ratio |\n|---|---|---|---|")
    for b in args.batches:
        engine = Engine(model, max_batch=b, max_len=args.context, buckets=(b,))
        times = {False: [], True: []}
        for _ in range(args.reps):
            for logprobs in (False, True):
                fn = (lambda: engine._run_decode(b, True, None, logprobs))
                fn()   # captured (CUDA) or warmed up
                times[logprobs].append(bench(fn, device))
        off, on = (statistics.median(times[k]) for k in (False, True))
        print(f"| {b} | {off:.4f} | {on:.4f} | {on / off:.3f} |", flush=True)


if __name__ == "__main__":
    main()
