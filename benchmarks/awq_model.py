"""AWQ int4 at the model level (issue 12's quality, quantization-time and decode goals), one run:

    python benchmarks/awq_model.py --train small --train-steps 600      # quality of a GPU-trained run
    python benchmarks/awq_model.py --run RUN_DIR                         # ... of an existing run
    python benchmarks/awq_model.py --big qwen3-30b-a3b                   # time to quantize, decode
    python benchmarks/awq_model.py --device cpu --train tiny --train-steps 30 --big tiny  # smoke

1. Quality: `dropless quantize` of the run (quantize_run: AWQ with the default calibration, 128
   windows of 512 tokens, or of the model's max_seq_len where shorter, of the run's own corpus,
   training split), then `dropless eval` of the run and of the quantized run on the run's
   validation split (evaluate_dir, the same windows for both): validation loss and perplexity,
   and the int4 / bf16 perplexity ratio. `--train PRESET` first trains that preset through
   `dropless.train.train()` (what `dropless train` runs).
2. Quantization time (`--big PRESET`): the preset with random bf16 weights built on the device
   (decode.build: a 30 B model never exists in fp32), AWQ-quantized in place by quantize_model on
   `--calib-samples` random token windows of `--calib-seq-len` (the searches' cost depends on the
   shapes and on how many tokens each expert receives, not on the text), timed wall-clock; with
   `--rtn` rounded to nearest instead (quantize_rtn), to measure decode alone.
3. Decode at batch 1 through the inference engine (decode.time_engine: greedy, prompt 32, 128
   new tokens, the decode step as a CUDA graph), the bf16 model before quantization and the int4
   model after: tokens/s and their ratio. (On a CPU the "bf16" model is fp32.) On a GPU the bf16
   model also decodes without the projection GEMV kernel and the norm folded into the router
   (dropless/ops/triton_linear.py, norm_route_topk): what those two are worth, same run.
   `--ab SWITCH` (an on/off environment switch, e.g. DROPLESS_DECODE_FUSION) also decodes each
   model with SWITCH=0 and SWITCH=1, alternating, `--reps` times each: medians side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from decode import build, sync   # this script's folder
from decode_switches import decode_configs, tokens_per_s
from dropless.config import TrainConfig, get_preset
from dropless.evaluate import evaluate_dir
from dropless.quant.calibrate import quantize_model
from dropless.quant.modules import QuantConfig, quantize_rtn
from dropless.quant.run import quantize_run
from dropless.train import train


def quality(run_dir: str, device: str, work: Path) -> dict:
    out = work / "int4"
    start = time.perf_counter()
    summary = quantize_run(run_dir, out, device=device)
    seconds = time.perf_counter() - start
    bf16, int4 = evaluate_dir(run_dir, device=device), evaluate_dir(out, device=device)
    return {"run": run_dir, "quantize_s": seconds, "val_loss_bf16": bf16["val_loss"],
            "val_loss_int4": int4["val_loss"], "ppl_bf16": bf16["val_ppl"],
            "ppl_int4": int4["val_ppl"], "ppl_ratio": int4["val_ppl"] / bf16["val_ppl"],
            "eval_tokens": bf16["tokens"],
            "expert_bytes_ratio": summary["expert_bytes_int4"] / summary["expert_bytes_bf16"]}


def decode_ab(model, device: str, switch: str, reps: int) -> dict:
    """{"0": tokens/s, "1": tokens/s, "agree": n}: batch-1 decode with the environment switch
    off and on, alternating, median of reps (decode_switches.decode_configs); agree: how many of
    64 greedy tokens the two settings share before they first differ."""
    off, on = decode_configs(model, device, [{switch: "0"}, {switch: "1"}], reps)
    print(f"{switch}: 0 {[round(x, 1) for x in off['runs']]}, 1 {[round(x, 1) for x in on['runs']]}"
          f"; greedy tokens agree for {on['agree']} of 64", flush=True)
    return {"0": off["median"], "1": on["median"], "agree": on["agree"]}


def without_projection_kernels(model, device: str) -> float:
    """tokens_per_s with the dense projections as rms_norm + F.linear and addmm (no
    linear_rows GEMV) and the MoE norm as its own kernel before the router kernels."""
    from dropless.serve import decode, moe_decode
    gates = decode.fused_linear, moe_decode.norm_route

    def norm_then_route(norm, router, x_TD):
        h_TD = moe_decode.rms_norm(norm, x_TD)
        return *moe_decode.route(router, h_TD), h_TD

    decode.fused_linear, moe_decode.norm_route = (lambda x: False), norm_then_route
    try:
        return tokens_per_s(model, device)
    finally:
        decode.fused_linear, moe_decode.norm_route = gates


def big(preset: str, device: str, samples: int, seq_len: int, rtn: bool = False,
        ab: str | None = None, reps: int = 3) -> dict:
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model = build(preset, device, dtype)
    res = {"preset": preset, "calib": [samples, seq_len] if not rtn else "none (round to nearest)",
           "decode_bf16_tokens_per_s": tokens_per_s(model, device)}
    if ab:
        res["ab"] = {"switch": ab, "bf16": decode_ab(model, device, ab, reps)}
    if device != "cpu":
        res["decode_bf16_no_projection_kernels"] = without_projection_kernels(model, device)
        print(f"bf16 decode: {res['decode_bf16_tokens_per_s']:.1f} tokens/s; without the "
              f"projection kernels {res['decode_bf16_no_projection_kernels']:.1f}", flush=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (samples, seq_len), generator=g)
    sync(device)
    start = time.perf_counter()
    if rtn:
        quantize_rtn(model, QuantConfig())
    else:
        quantize_model(model, tokens, QuantConfig())
    sync(device)
    res["quantize_s"] = time.perf_counter() - start
    res["decode_int4_tokens_per_s"] = tokens_per_s(model, device)
    res["decode_ratio"] = res["decode_int4_tokens_per_s"] / res["decode_bf16_tokens_per_s"]
    if ab:
        res["ab"]["int4"] = decode_ab(model, device, ab, reps)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--run", help="a trained run directory to quantize and evaluate")
    ap.add_argument("--train", metavar="PRESET", help="train this preset first (then as --run)")
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--big", metavar="PRESET", help="time quantization and decode at this preset")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--rtn", action="store_true", help="--big: round to nearest instead of AWQ "
                    "(seconds, not minutes; decode speed does not depend on the values)")
    ap.add_argument("--ab", metavar="SWITCH", help="--big: also decode with the environment switch "
                    "SWITCH=0 and =1 (e.g. DROPLESS_DECODE_FUSION), alternating, --reps each")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", help="where runs are written (default: a temporary directory, "
                    "removed at the end)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not (args.run or args.train or args.big):
        ap.error("give --run, --train or --big")
    if args.work:
        return measure(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="awq_model-") as work:
        return measure(args, Path(work))


def measure(args, work: Path) -> int:
    res = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    run_dir = args.run
    if args.train:
        cfg = TrainConfig(out=str(work / args.train), preset=args.train, steps=args.train_steps,
                          device=args.device, sample_tokens=0)
        s = train(cfg, progress=False)
        res["train"] = {k: s[k] for k in ("preset", "step", "tokens_per_s", "precision", "val_loss")}
        run_dir = s["run_dir"]
    if run_dir:
        res["quality"] = quality(run_dir, args.device, work)
    if args.big:
        get_preset(args.big)   # a clear error before anything is built
        res["big"] = big(args.big, args.device, args.calib_samples, args.calib_seq_len,
                         args.rtn, args.ab, args.reps)
    print("| measurement | bf16 | int4 | int4 / bf16 |")
    print("|---|---|---|---|")
    if "quality" in res:
        q = res["quality"]
        print(f"| val loss ({q['eval_tokens']:,} tokens) | {q['val_loss_bf16']:.4f} | "
              f"{q['val_loss_int4']:.4f} | |")
        print(f"| perplexity | {q['ppl_bf16']:.3f} | {q['ppl_int4']:.3f} | {q['ppl_ratio']:.4f} |")
        print(f"| packed expert bytes | | | {q['expert_bytes_ratio']:.3f} |")
        print(f"| quantize_run seconds | | {q['quantize_s']:.1f} | |")
    if "big" in res:
        b = res["big"]
        calib = (f"{b['calib'][0]} x {b['calib'][1]} tokens" if isinstance(b["calib"], list)
                 else b["calib"])
        print(f"| {b['preset']}: quantize seconds ({calib}) | | {b['quantize_s']:.1f} | |")
        print(f"| {b['preset']}: decode tokens/s, batch 1 | {b['decode_bf16_tokens_per_s']:.1f} | "
              f"{b['decode_int4_tokens_per_s']:.1f} | {b['decode_ratio']:.2f} |")
        if "ab" in b:
            ab = b["ab"]
            for v in ("0", "1"):
                print(f"| {b['preset']}: decode tokens/s, batch 1, {ab['switch']}={v} (median of "
                      f"{args.reps}) | {ab['bf16'][v]:.1f} | {ab['int4'][v]:.1f} | "
                      f"{ab['int4'][v] / ab['bf16'][v]:.2f} |")
            print(f"| {b['preset']}: greedy tokens equal with {ab['switch']} 0 and 1 (of 64) | "
                  f"{ab['bf16']['agree']} | {ab['int4']['agree']} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
