"""Decode through the engine under several settings of the decode step's environment switches
(DROPLESS_PDL, DROPLESS_PDL_PRELOAD, DROPLESS_DECODE_FUSION, ...), alternating in one process on
one model, so that which of them pays on the product path is measured side by side:

    python benchmarks/decode_switches.py --preset qwen3-30b-a3b \\
        --configs "" DROPLESS_PDL=0 DROPLESS_PDL_PRELOAD=1
    python benchmarks/decode_switches.py --device cpu --preset tiny --configs "" DROPLESS_PDL=1

Each config is a comma-separated list of NAME=VALUE ("" for the environment as it is); the
fusion's sites one at a time, e.g. DROPLESS_DECODE_FUSION=topk (device.FUSION_SITES). The model
is decode.build's (random weights made on the device, experts k-major as serve loads them); each
timing is decode.time_engine's (greedy, prompt 32, --new tokens, the step a CUDA graph captured
under that config), `--reps` rounds over all configs, medians reported; "ms/step" is one decode
step alone (decode.step_ms: no prefill, no host bookkeeping), the steadier figure. "agree": how
many of the first config's greedy tokens the config reproduces before the first that differs (a
sum in another order may round apart late; a broken path differs at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from decode import build, prompts_for, step_ms, time_engine   # this script's folder
from dropless.quant.modules import QuantConfig, quantize_rtn
from dropless.serve.engine import Engine
from dropless.serve.request import Request, SamplingParams


def parse_config(text: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in filter(None, text.split(","))]
    if any(not name or not sep for name, sep, _ in pairs):
        raise SystemExit(f"--configs: {text!r} is invalid: allowed: NAME=VALUE[,NAME=VALUE...]")
    return {name.strip(): value.strip() for name, _, value in pairs}


def under(config: dict[str, str], fn):
    """fn() with the environment switches of config set, restored after."""
    before = {name: os.environ.get(name) for name in config}
    os.environ.update(config)
    try:
        return fn()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def greedy_tokens(model, new: int = 64, prompt: int = 32) -> list[int]:
    engine = Engine(model, max_batch=1, max_len=prompt + new, buckets=(1,))
    request = engine.submit(Request(prompts_for(1, prompt, model.cfg.vocab_size, seed=2)[0],
                                    SamplingParams(max_tokens=new, temperature=0)))
    engine.run_until_done()
    return request.output


def tokens_per_s(model, device: str, batch: int = 1, prompt: int = 32, new: int = 128) -> float:
    engine = Engine(model, max_batch=batch, max_len=prompt + new, buckets=(batch,))
    return batch * new / time_engine(engine, prompts_for(batch, prompt, model.cfg.vocab_size,
                                                         seed=1), new, device)


def decode_step_ms(model, batch: int = 1, prompt: int = 32, new: int = 128) -> float:
    """decode.step_ms: the median ms of one decode step of `batch` rows alone (the captured
    graph on CUDA), free of the prefill and the host's bookkeeping."""
    return step_ms(Engine(model, max_batch=batch, max_len=prompt + new, buckets=(batch,)), batch)


def decode_configs(model, device: str, configs: list[dict[str, str]], reps: int,
                   batch: int = 1, new: int = 128) -> list[dict]:
    """[{"config", "runs" (tokens/s), "median", "step_ms", "agree"}] per config, timed
    alternating; step_ms the median over reps of decode_step_ms."""
    tokens = [under(c, lambda: greedy_tokens(model)) for c in configs]
    runs: list[list[float]] = [[] for _ in configs]
    steps: list[list[float]] = [[] for _ in configs]
    for _ in range(reps):
        for c, r, st in zip(configs, runs, steps):
            r.append(under(c, lambda: tokens_per_s(model, device, batch, new=new)))
            st.append(under(c, lambda: decode_step_ms(model, batch, new=new)))
    out = []
    for c, r, st, t in zip(configs, runs, steps, tokens):
        agree = next((i for i, (a, b) in enumerate(zip(tokens[0], t)) if a != b), len(t))
        out.append({"config": c, "runs": r, "median": statistics.median(r),
                    "step_ms": statistics.median(st), "agree": agree})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", nargs="+", default=["", "DROPLESS_PDL=0",
                                                     "DROPLESS_PDL_PRELOAD=1"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows (config, runs, medians, agree) here")
    ap.add_argument("--int4", action="store_true", help="the experts and attention projections "
                    "rounded to int4 first (quantize_rtn: speed does not depend on the values)")
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.configs]
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    model = build(args.preset, args.device, dtype)
    if args.int4:
        quantize_rtn(model, QuantConfig())
    name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    print(f"# {args.preset}{' int4' if args.int4 else ''}, batch {args.batch}, {name}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; tokens/s (median of "
          f"{args.reps}, alternating)")
    rows = decode_configs(model, args.device, configs, args.reps, args.batch, args.new)
    base = rows[0]["median"]
    print("| config | tokens/s | runs | x first | ms/step | greedy tokens agree (of 64) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        label = ",".join(f"{k}={v}" for k, v in row["config"].items()) or "(environment)"
        print(f"| {label} | {row['median']:.1f} | {', '.join(f'{x:.1f}' for x in row['runs'])} | "
              f"{row['median'] / base:.3f} | {row['step_ms']:.3f} | {row['agree']} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "preset": args.preset, "int4": args.int4, "batch": args.batch, "device": name,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows},
            indent=2))


if __name__ == "__main__":
    main()
