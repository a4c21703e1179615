"""`dropless train` at world 1 and world N, side by side in one call: tokens/s per GPU of each layout
against one GPU, then a world-N run resumed elastically in one process.

    python benchmarks/train_scaling.py --out-dir OUT [--gpus 2] [--preset medium] [--steps 20]

Every run is the product path (`python -m dropless train`, under torchrun for N > 1) with the same
tokens per GPU per step (`--batch-per-gpu` x `--seq-len`; the global batch grows with N: weak
scaling). tokens/s comes from each run's metrics.jsonl (global tokens over each 2-step log window, eval
excluded), median of the windows after the first (allocator and NCCL warm-up; the median also
drops the window that holds the mid-run checkpoint), divided by the number of GPUs. Checkpoints
are written every `--ckpt-every` steps and at the end, and deleted after each run (a medium
checkpoint with its AdamW state is ~16 GB). Prints one table; each run's log is OUT/<name>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}   # the GPU machines require NVLink multicast off


def launch(nproc: int, flags: list[str], log: Path) -> tuple[int, float]:
    """Run `dropless train` on nproc processes; returns (exit code, wall seconds)."""
    prefix = [sys.executable, "-m", "dropless"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(nproc), "-m", "dropless"]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **NCCL_ENV, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(prefix + ["train", *flags], stdout=f, stderr=subprocess.STDOUT, env=env)
    return code, time.perf_counter() - start


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--cache-dir", default=None, help="token cache (default OUT/cache)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-per-gpu", type=int, default=8)
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--layouts", default="ep,dp-shard,dp-replicate")
    parser.add_argument("--elastic-preset", default="small", help="'' to skip the resume check")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    N = args.gpus
    cache = args.cache_dir or str(out / "cache")
    common = ["--preset", args.preset, "--tokenizer", args.tokenizer, "--vocab", str(args.vocab),
              "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--warmup", "5",
              "--eval-every", str(max(1, args.steps // 2)), "--eval-batches", "2",
              "--ckpt-every", str(args.ckpt_every), "--log-every", "2",
              "--sample-tokens", "0", "--quiet", "--cache-dir", cache]
    runs = [("1 GPU", 1, [])] + [(f"{name} {N}", N, [f"--{name}", str(N)])
                                 for name in args.layouts.split(",")]
    rows = []
    for name, nproc, extra in runs:
        tag = name.replace(" ", "_")
        run_dir = out / "runs" / tag
        flags = common + ["--batch-size", str(args.batch_per_gpu * nproc), "--out", str(run_dir),
                          *extra]
        code, wall = launch(nproc, flags, out / f"{tag}.log")
        lines = metrics(run_dir)
        rates = [r["tokens_per_s"] for r in lines[1:]] or [float("nan")]
        if lines:
            shutil.copy(run_dir / "metrics.jsonl", out / f"{tag}.metrics.jsonl")
        shutil.rmtree(run_dir, ignore_errors=True)
        rows.append((name, nproc, code, wall, statistics.median(rates) / nproc,
                     lines[-1]["loss"] if lines else float("nan")))
    base = rows[0][4]
    print(f"# dropless train --preset {args.preset}, seq {args.seq_len} x {args.batch_per_gpu} per "
          f"GPU, {args.steps} steps; tokens/s per GPU = median over log windows after the first")
    print("| run | GPUs | exit | wall s | tokens/s per GPU | vs 1 GPU | last loss |")
    print("|---|---|---|---|---|---|---|")
    for name, nproc, code, wall, rate, loss in rows:
        print(f"| {name} | {nproc} | {code} | {wall:.0f} | {rate:,.0f} | {rate / base:.2f} | "
              f"{loss:.3f} |")

    if args.elastic_preset:
        # a world-N EP run, then resumed in one process with more steps
        run_dir = out / "runs" / "elastic"
        flags = ["--preset", args.elastic_preset, "--steps", "20", "--ckpt-every", "10",
                 "--eval-every", "10", "--eval-batches", "2", "--log-every", "5", "--seq-len", "256",
                 "--batch-size", str(8 * N), "--sample-tokens", "0", "--quiet",
                 "--cache-dir", cache, "--out", str(run_dir), "--ep", str(N)]
        code_n, _ = launch(N, flags, out / "elastic_world.log")
        code_1, _ = launch(1, ["--resume", str(run_dir), "--steps", "30", "--quiet",
                               "--cache-dir", cache], out / "elastic_resumed.log")
        lines = metrics(run_dir)
        steps = [r["step"] for r in lines]
        print(f"\nelastic: {args.elastic_preset} at world {N} (exit {code_n}) resumed in one "
              f"process (exit {code_1}): logged steps {steps}; losses "
              f"{[round(r['loss'], 3) for r in lines]}")
        if lines:
            shutil.copy(run_dir / "metrics.jsonl", out / "elastic.metrics.jsonl")
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
