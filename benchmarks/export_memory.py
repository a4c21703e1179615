"""Peak host memory of writing a model as a Hugging Face directory (`to_hf`, what `dropless convert
--to-hf` runs), against the model's own bytes. Since round 30 each shard's tensors are made just
before the shard is written and dropped after it, so the extra memory is one shard (at most
--shard-gb); before, every shard was made first, a second copy of the whole model.

    python benchmarks/export_memory.py                        # preset small, bf16, 0.1 GB shards
    python benchmarks/export_memory.py --preset tiny --shard-gb 0.001 --json out.json

Each case runs in its own process: the preset's model, random, built in --dtype, then written.
Resident memory in MB: once the model is built, and the peak while writing (Linux's VmHWM, reset
after the build); "extra" is their difference, beside the model's bytes and the largest shard's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    """VmRSS (resident memory now) or VmHWM (its peak since the last _reset_peak), in MB."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":"))) / 1e3


def _reset_peak() -> None:
    """The peak restarts from now (so building the model does not count as writing it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _case(preset: str, dtype: str, shard_bytes: int, out: str) -> dict:
    """In this process: build, write, measure."""
    from dropless.config import PRESETS
    from dropless.hf import to_hf
    from dropless.model import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS[preset]).to(getattr(torch, dtype))
    built = _status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    to_hf(model, out, max_shard_bytes=shard_bytes)
    seconds = time.perf_counter() - t0
    files = sorted(Path(out).glob("*.safetensors"))
    return {"preset": preset, "dtype": dtype, "shard_bytes": shard_bytes,
            "model_bytes": sum(p.nbytes for p in model.parameters()),
            "written_bytes": sum(f.stat().st_size for f in files), "shards": len(files),
            "largest_shard_bytes": max(f.stat().st_size for f in files),
            "rss_built_mb": built,
            "rss_peak_mb": _status_mb("VmHWM"),
            "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--shard-gb", type=float, nargs="+", default=[0.1])
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--case", nargs=4, help=argparse.SUPPRESS)   # preset dtype bytes out: one case
    args = p.parse_args()
    if args.case:
        preset, dtype, shard, out = args.case
        print(json.dumps(_case(preset, dtype, int(shard), out)))
        return
    rows = []
    for gb in args.shard_gb:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, __file__, "--case", args.preset, args.dtype,
                                   str(int(gb * 1e9)), str(Path(tmp) / "hf")],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.splitlines()[-1]))
    print(f"preset {args.preset} in {args.dtype}, to_hf\n")
    print("| shard limit MB | shards | model MB | largest shard MB | RSS MB built | peak MB "
          "writing | extra MB | extra / model | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["rss_peak_mb"] - r["rss_built_mb"]
        print(f"| {r['shard_bytes'] / 1e6:.0f} | {r['shards']} | {r['model_bytes'] / 1e6:.0f} | "
              f"{r['largest_shard_bytes'] / 1e6:.0f} | {r['rss_built_mb']:.0f} | "
              f"{r['rss_peak_mb']:.0f} | {extra:.0f} | {extra * 1e6 / r['model_bytes']:.2f} | "
              f"{r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
