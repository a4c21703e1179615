"""The decode step's dense projections at a few tokens: the torch ops (rms_norm + F.linear over the
fused q|k|v weight; addmm of o_proj with the residual) against the GEMV kernel
(dropless/ops/triton_linear.py), and the kernel's tiles swept. us per call: one CUDA graph of
CALLS calls back to back, over COPIES copies of the weights (more bytes than L2 holds: every call
reads from memory, as a decode step's layers do), timed by triton's do_bench (median), / CALLS.
A graph of one call would time the host's launch latency with it (~10 us on an idle GPU: every
kernel measured ~1.1 TB/s that way, round 16). GB/s of the weight bytes.

    python benchmarks/decode_linear.py                         # H200: medium and Qwen3-30B-A3B
    python benchmarks/decode_linear.py --tokens 1 --sweep      # and the tile grid at T = 1
    TRITON_INTERPRET=1 python benchmarks/decode_linear.py --device cpu --shapes cpu --tokens 1  # smoke
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from dropless.ops import triton_linear
from gemv_tiles import CALLS, repeated   # this script's folder
from moe_layer import bench

# name: (D, q|k|v outputs, o_proj inputs) of the preset's attention
SHAPES = {"medium": (1024, 1536, 1024), "qwen3": (2048, 5120, 4096), "cpu": (128, 192, 128)}
GRID = {"TILE": (2048, 4096), "WAVES": (2, 4, 8), "UNROLL": (4, 8), "NUM_WARPS": (4, 8)}
COPIES = 6


def cases(D, NQKV, HD, T, device, dtype, copies):
    """(name, bytes, torch fns, kernel fns) for the two projections of one layer, one fn per
    copy of the weights."""
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, D, generator=g).to(device, dtype)
    norm_w = (1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype)
    attn = torch.randn(T, HD, generator=g).to(device, dtype)
    w_qkv = [(torch.randn(NQKV, D, generator=g) * D ** -0.5).to(device, dtype)
             for _ in range(copies)]
    w_o = [(torch.randn(D, HD, generator=g) * HD ** -0.5).to(device, dtype) for _ in range(copies)]
    return [
        ("norm+qkv", w_qkv[0].numel() * w_qkv[0].element_size(),
         [lambda w=w: F.linear(F.rms_norm(x, (D,), norm_w, 1e-6), w) for w in w_qkv],
         [lambda w=w: triton_linear.linear_rows(x, w, norm_w, 1e-6, None) for w in w_qkv]),
        ("o_proj+res", w_o[0].numel() * w_o[0].element_size(),
         [lambda w=w: torch.addmm(x, attn, w.t()) for w in w_o],
         [lambda w=w: triton_linear.linear_rows(attn, w, None, 0.0, x) for w in w_o]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["medium", "qwen3"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--sweep", action="store_true", help="also the tile grid (first token count)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ("TILE", "WAVES", "UNROLL", "NUM_WARPS")
    current = {k: getattr(triton_linear, k) for k in names}
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}; current {current}")
    print(f"{'shape':8}{'T':>3} {'op':12}{'torch us':>10}{'kernel us':>10}{'speedup':>8}"
          f"{'kernel GB/s':>12}{'err':>10}")
    for shape in args.shapes:
        D, NQKV, HD = SHAPES[shape]
        for T in args.tokens:
            copies = COPIES if device.type == "cuda" else 1
            for op, nbytes, ref_fns, fns in cases(D, NQKV, HD, T, device, dtype, copies):
                ref, fn = ref_fns[0]().float(), fns[0]
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                t_ref, t = (bench(repeated(f, device), device) / CALLS for f in (ref_fns, fns))
                print(f"{shape:8}{T:3} {op:12}{t_ref * 1e3:10.1f}{t * 1e3:10.1f}"
                      f"{t_ref / t:8.2f}{nbytes / t / 1e6:12.0f}{err:10.1e}", flush=True)
                if not (args.sweep and T == args.tokens[0]):
                    continue
                best = (t, dict(current))
                for values in itertools.product(*(GRID[k] for k in names)):
                    setting = dict(zip(names, values))
                    for k, v in setting.items():
                        setattr(triton_linear, k, v)
                    try:
                        e = ((fn().float() - ref).norm() / ref.norm()).item()
                        t_s = bench(repeated(fns, device), device) / CALLS
                    except Exception as exc:   # e.g. out of registers: keep sweeping
                        print(f"    {setting}: {type(exc).__name__}")
                        continue
                    print(f"    {setting}: {t_s * 1e3:7.1f} us {nbytes / t_s / 1e6:6.0f} GB/s "
                          f"err {e:.1e}", flush=True)
                    best = min(best, (t_s, setting), key=lambda b: b[0])
                for k, v in current.items():
                    setattr(triton_linear, k, v)
                print(f"  best {shape} T={T} {op}: {best[0] * 1e3:.1f} us {best[1]}", flush=True)


if __name__ == "__main__":
    main()
