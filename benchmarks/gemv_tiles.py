"""The decode experts' GEMV tiles (dropless/ops/gemv.py TILES), swept: bf16 and int4 expert weights
at the medium, Qwen3-30B-A3B and Mixtral expert shapes, a few tokens, every (BLOCK_N, BLOCK_K,
UNROLL, WAVES) in the grid. Prints us per call: one CUDA graph of CALLS calls, each routing to its
own draw of experts (more expert bytes than L2 holds: every call reads from memory, as a decode
step's layers do), timed by triton's do_bench (median), / CALLS. A graph of ONE call times the
host's launch latency with it (round 16: every kernel then read ~1.1 TB/s; round 12's sweep was
timed that way). Also the bandwidth of the expert bytes read, the error against the current
tiles' output, and each kind's best. A "floor" row reads the same number of expert bytes (plain)
with torch's sum over contiguous experts, two launches as the GEMVs take, the same way: what one
well-tuned streaming read of that size reaches on this GPU, launch ramp and tail included.

    python benchmarks/gemv_tiles.py                       # H200: minutes (each tile compiles)
    python benchmarks/gemv_tiles.py --shapes qwen3 --tokens 1 4 --kinds int4
    python benchmarks/gemv_tiles.py --shapes qwen3 --tokens 1 --kinds int4 --unpack interleave \
        --tiles 64,32,4,6 128,32,4,6    # the other int4 kernel, two tiles
    python benchmarks/gemv_tiles.py --shapes qwen3 --tokens 1 --tiles 128,32,4,4 --stages 1 2 \
        --warps 4 8                     # loop pipelining and warps per program, swept
    TRITON_INTERPRET=1 python benchmarks/gemv_tiles.py --device cpu --shapes cpu --quick  # smoke

The int4 "speedup" column is the best bf16 time over the best int4 time at the same shape and
tokens: issue 12's batch-1 goal (>= 2.5x) at the level of the experts alone.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from dropless.ops import gemv
from dropless.ops.awq import UNPACKS
from dropless.quant.modules import QuantizedExperts
from moe_layer import bench   # the benchmarks' one timing helper (this script's folder)

SHAPES = {"medium": (1024, 512, 64, 8), "qwen3": (2048, 768, 128, 8),   # D, F, E, K
          "mixtral": (4096, 14336, 8, 2), "cpu": (128, 128, 8, 2)}
GROUP = 128
CALLS = 24
GRID = {"BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64), "UNROLL": (2, 4, 8), "WAVES": (2, 4, 6, 8)}
QUICK = {"BLOCK_N": (32, 64), "BLOCK_K": (32,), "UNROLL": (2, 4), "WAVES": (4,)}


def start(device_name: str, what: str):
    """(device, dtype: bf16 on a GPU, fp32 under the interpreter), after the table's first line:
    the device, torch and triton, and `what` the table holds."""
    import triton
    device = torch.device(device_name)
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, triton {triton.__version__}; {what}")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def expert_weights(name: str, device, dtype):
    """(D, F, E, K) of the shape, and random experts (seed 0): gate|up [E, D, 2F], down [E, F, D]."""
    D, F, E, K = SHAPES[name]
    torch.manual_seed(0)
    gate_up = torch.randn(E, D, 2 * F, device=device, dtype=dtype) * D ** -0.5
    down = torch.randn(E, F, D, device=device, dtype=dtype) * F ** -0.5
    return (D, F, E, K), gate_up, down


def quantized(gate_up, down, device) -> QuantizedExperts:
    """The experts rounded to int4 (GROUP) and packed as the engine holds them."""
    E, D, F2 = gate_up.shape
    q = QuantizedExperts(E, D, F2 // 2, GROUP, device=device)
    q.gate_up.set_from(gate_up)
    q.down.set_from(down)
    return q


def graphed(fn, device):
    """fn replayed from a CUDA graph (the engine's way), or fn itself on a CPU."""
    if device.type != "cuda":
        return fn
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def repeated(fns, device, calls=CALLS):
    """One callable running fns[i % len(fns)] for i < calls, as one CUDA graph on a GPU."""
    def run():
        for i in range(calls):
            fns[i % len(fns)]()
    return graphed(run, device) if device.type == "cuda" else run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["medium", "qwen3", "mixtral"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--kinds", nargs="+", default=["plain", "int4"], choices=["plain", "int4"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a small grid")
    ap.add_argument("--tiles", nargs="+", metavar="BN,BK,UNROLL,WAVES",
                    help="these tiles instead of a grid")
    ap.add_argument("--unpack", default=UNPACKS[0], choices=UNPACKS,
                    help="how the int4 kernels read the packed int32s (DROPLESS_AWQ_UNPACK)")
    ap.add_argument("--warps", type=int, nargs="+", default=[0], metavar="N",
                    help="warps per program to sweep (0: the kind's default, gemv.WARPS)")
    ap.add_argument("--stages", type=int, nargs="+", default=[0], metavar="N",
                    help="software-pipelining stages of the loops to sweep (DROPLESS_GEMV_STAGES; "
                         "0: the kind's default, gemv.STAGES)")
    args = ap.parse_args()
    device = torch.device(args.device)
    grid = QUICK if args.quick else GRID
    tiles = (list(itertools.product(*grid.values())) if not args.tiles else
             [tuple(int(v) for v in t.split(",")) for t in args.tiles])
    current = dict(gemv.TILES)
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}; current TILES {current}; int4 unpack {args.unpack}")
    print(f"{'shape':8}{'T':>3} {'kind':6}{'BLOCK_N':>8}{'BLOCK_K':>8}{'UNROLL':>7}{'WAVES':>6}"
          f"{'STAGES':>7}{'WARPS':>6}{'us':>9}{'GB/s':>8}{'err':>10}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in args.shapes:
        (D, F, E, K), gate_up, down = expert_weights(name, device, dtype)
        q = quantized(gate_up, down, device)
        weights = {"plain": (gate_up, down), "int4": (q.gate_up.packed, q.down.packed)}
        nbytes = {"plain": 3 * D * F * gate_up.element_size(),
                  "int4": q.nbytes() / E}   # per expert
        for T in args.tokens:
            x = torch.randn(T, D, device=device, dtype=dtype)
            draws = [torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)])
                     for _ in range(CALLS if device.type == "cuda" else 1)]
            ids = draws[0]
            w = torch.rand(T, K, device=device).softmax(-1)
            used = sum(d.unique().numel() for d in draws) / len(draws)
            best = {}
            if "plain" in args.kinds:   # the streaming-read floor of the same bytes
                n = max(1, round(used))
                reads = [lambda i=i: (gate_up[i * n % (E - n + 1):][:n].sum(dtype=torch.float32),
                                      down[i * n % (E - n + 1):][:n].sum(dtype=torch.float32))
                         for i in range(len(draws))]
                us = bench(repeated(reads, device, len(reads)), device) * 1e3 / len(reads)
                print(f"{name:8}{T:>3} {'floor':6}{'torch.sum of the same bytes':>49}{us:9.1f}"
                      f"{n * nbytes['plain'] / us / 1e3:8.0f}", flush=True)
            for kind in args.kinds:
                gu, dn = weights[kind]
                gemv.TILES.update(current)
                ref = gemv.decode_experts(x, ids, w, gu, dn).float()
                warps = dict(gemv.WARPS)
                for (bn, bk, un, wv), st, wp in itertools.product(tiles, args.stages, args.warps):
                    gemv.TILES[kind] = (bn, bk, un, wv)
                    st = st or gemv.STAGES[kind]
                    os.environ[gemv.STAGES_ENV] = f"{kind}={st}"
                    wp = gemv.WARPS[kind] = wp or warps[kind]
                    try:
                        y = gemv.decode_experts(x, ids, w, gu, dn, args.unpack).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        fns = [lambda d=d: gemv.decode_experts(x, d, w, gu, dn, args.unpack)
                               for d in draws]
                        us = bench(repeated(fns, device, len(fns)), device) * 1e3 / len(fns)
                    except Exception as e:   # a tile the kernel's asserts or resources refuse
                        print(f"{name:8}{T:>3} {kind:6}{bn:>8}{bk:>8}{un:>7}{wv:>6}{st:>7}{wp:>6}  "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
                        continue
                    gbs = used * nbytes[kind] / us / 1e3
                    print(f"{name:8}{T:>3} {kind:6}{bn:>8}{bk:>8}{un:>7}{wv:>6}{st:>7}{wp:>6}"
                          f"{us:9.1f}{gbs:8.0f}{err:10.1e}", flush=True)
                    if err < 1e-2 and us < best.get(kind, (float("inf"),))[0]:
                        best[kind] = (us, (bn, bk, un, wv, st, wp))
                gemv.TILES.update(current)
                gemv.WARPS.update(warps)
                os.environ.pop(gemv.STAGES_ENV)
            for kind, (us, tile) in best.items():
                print(f"best {name} T={T} {kind}: {tile} {us:.1f} us")
            if len(best) == 2:
                print(f"speedup {name} T={T}: int4 {best['plain'][0] / best['int4'][0]:.2f}x bf16")


if __name__ == "__main__":
    main()
