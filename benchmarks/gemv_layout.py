"""Does the decode experts' weight layout bound their GEMVs? The engine's experts hold gate|up as
[E, D, 2F] and down as [E, F, D] (the training layout: output features contiguous), so a batch-1
GEMV program reads short runs (BLOCK_N columns) of many rows. This times, at one token, in CUDA
graphs of CALLS calls that each route to their own draw of experts (more bytes than L2 holds):

  floor    torch.sum over the same number of contiguous expert bytes (two launches)
  current  dropless.ops.gemv.decode_experts on the training layout (3 kernels)
  kmajor   gemv.decode_experts_kmajor, two kernels on the transposed layout ([E, 2F, D] and
           [E, D, F]: every output's weights one contiguous run of the reduction axis): gate|up
           with SwiGLU, then down summing the K slots with their routing weights in the same
           program (no partials, no sum kernel); the engine's layout since round 22

for a sweep of kmajor tiles, with each output checked against `current`.

    python benchmarks/gemv_layout.py                        # H100/H200: ~1 minute
    TRITON_INTERPRET=1 python benchmarks/gemv_layout.py --device cpu --shapes cpu   # smoke
"""

from __future__ import annotations

import argparse
import itertools

import torch

from dropless.ops import gemv
from gemv_tiles import CALLS, expert_weights, repeated, start
from moe_layer import bench


def kmajor(x, ids, s, gu_t, dn_t, tile):
    """gemv.decode_experts_kmajor on the transposed weights; tile = (gate_up BN, BK, warps,
    down BN, BK, warps)."""
    tiles = {"gate_up": tile[:3], "down": tile[3:]}
    return gemv.decode_experts_kmajor(x, ids, s, gu_t.transpose(1, 2), dn_t.transpose(1, 2),
                                      tiles=tiles)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3", "mixtral"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # round 22's last sweep (its first, results/h100_r22/gemv_layout_1.log: BLOCK_N 2-16, slower)
    ap.add_argument("--gate-up", nargs="+", default=["1,1024,4", "1,512,2", "1,2048,8", "2,1024,4"],
                    metavar="BN,BK,WARPS")
    ap.add_argument("--down", nargs="+", default=["1,256,2", "1,256,1", "1,128,1", "2,128,1"],
                    metavar="BN,BK,WARPS")
    args = ap.parse_args()
    device, dtype = start(args.device, f"T = 1; us per call (median; graph of {CALLS} calls)")
    for name in args.shapes:
        (D, F, E, K), gate_up, down = expert_weights(name, device, dtype)
        gu_t = gate_up.transpose(1, 2).contiguous()
        dn_t = down.transpose(1, 2).contiguous()
        x = torch.randn(1, D, device=device, dtype=dtype)
        s = torch.rand(1, K, device=device).softmax(-1)
        draws = [torch.randperm(E, device=device)[:K][None] for _ in range(CALLS)]
        mb = K * 3 * D * F * gate_up.element_size() / 1e6
        ref = gemv.decode_experts(x, draws[0], s, gate_up, down).float()
        reads = [lambda i=i: (gate_up[i * K % (E - K + 1):][:K].sum(dtype=torch.float32),
                              down[i * K % (E - K + 1):][:K].sum(dtype=torch.float32))
                 for i in range(CALLS)]
        rows = [("floor", None, repeated(reads, device))]
        rows.append(("current", ref, repeated(
            [lambda d=d: gemv.decode_experts(x, d, s, gate_up, down) for d in draws], device)))
        for g, d in itertools.product(args.gate_up, args.down):
            tile = tuple(int(v) for v in (g + "," + d).split(","))
            try:
                y = kmajor(x, draws[0], s, gu_t, dn_t, tile).float()
                fn = repeated([lambda d=d: kmajor(x, d, s, gu_t, dn_t, tile) for d in draws],
                              device)
            except Exception as exc:   # a tile the compiler or resources refuse
                print(f"{name:8} kmajor {tile}: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            rows.append((f"kmajor {g} | {d}", y, fn))
        for label, y, fn in rows:
            us = bench(fn, device) * 1e3 / CALLS
            err = "" if y is None else f"{((y - ref).norm() / ref.norm()).item():10.1e}"
            print(f"{name:8} {label:34}{us:9.1f} us {mb / us:7.2f} TB/s{err}", flush=True)
    if "qwen3" in args.shapes:
        linears(device, dtype)


def linears(device, dtype):
    """The Qwen3-30B-A3B attention's projections at one token: linear_rows (norm + q|k|v; o_proj
    + residual) against torch.sum of as many bytes, each of CALLS layers' own weights."""
    from dropless.ops.triton_linear import linear_rows
    for label, n, k, norm in (("qkv+norm", 5120, 2048, True), ("o_proj+res", 2048, 4096, False)):
        ws = [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5 for _ in range(CALLS)]
        x = torch.randn(1, k, device=device, dtype=dtype)
        nw = torch.ones(k, device=device, dtype=dtype) if norm else None
        res = None if norm else torch.randn(1, n, device=device, dtype=dtype)
        mb = n * k * ws[0].element_size() / 1e6
        for what, fns in (("floor", [lambda w=w: w.sum(dtype=torch.float32) for w in ws]),
                          ("linear_rows", [lambda w=w: linear_rows(x, w, nw, 1e-6, res)
                                           for w in ws])):
            us = bench(repeated(fns, device), device) * 1e3 / CALLS
            print(f"qwen3    {label + ' ' + what:34}{us:9.1f} us {mb / us:7.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
