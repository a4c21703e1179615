"""The decode step's attention, SDPA with the step's mask (dropless/serve/decode.py `gqa`) and the
split-KV Triton kernel (dropless/ops/triton_attention.py), side by side, one layer.

    python benchmarks/decode_attention.py                        # H200: Qwen3-30B-A3B's shape
    TRITON_INTERPRET=1 python benchmarks/decode_attention.py --device cpu --batches 1 --lengths 64

One token per row (b rows, H heads, G kv heads, Dh head dim) against a cache of `length`
positions, each row at a random position below it (the first at length - 1), bf16 on CUDA. On
CUDA each call is captured in a CUDA graph and the graph's replay is timed, as the engine runs
it. GB/s: the cache bytes the rows' positions reach (k and v), over the time. "max rel diff":
against SDPA, relative to SDPA's largest magnitude.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dropless.ops.triton_attention import CPU_PROGRAMS, decode_attention, num_splits
from dropless.ops.device import num_sms
from moe_layer import bench   # the benchmarks' one timing helper (this script's folder)


def graphed(fn, device):
    """fn as the replay of a CUDA graph on CUDA (after a warm-up call), else fn."""
    if device.type != "cuda":
        return fn
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 4, 128], metavar=("H", "G", "DH"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[160, 256, 1024, 4096])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    (H, G, Dh), g = args.heads, torch.Generator().manual_seed(0)
    print(f"H {H}, G {G}, Dh {Dh}, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}")
    print(f"{'b':>4}{'length':>8}{'splits':>8}{'sdpa us':>10}{'triton us':>11}{'sdpa GB/s':>11}"
          f"{'triton GB/s':>13}{'max rel diff':>14}")
    for b in args.batches:
        for length in args.lengths:
            q = torch.randn(b, H, Dh, generator=g).to(device, dtype)
            k_cache, v_cache = (torch.randn(b, G, length, Dh, generator=g).to(device, dtype)
                                for _ in range(2))
            positions = torch.randint(0, length, (b,), generator=g).to(device)
            positions[0] = length - 1
            mask = torch.zeros(b, 1, 1, length, device=device, dtype=dtype).masked_fill_(
                torch.arange(length, device=device) > positions.view(b, 1, 1, 1), float("-inf"))
            outs = {}

            def sdpa():
                outs["sdpa"] = F.scaled_dot_product_attention(
                    q.view(b, G, H // G, Dh), k_cache, v_cache, attn_mask=mask).view(b, H, Dh)

            def triton():
                outs["triton"] = decode_attention(q, k_cache, v_cache, positions, length)

            times = [bench(graphed(fn, device), device) * 1e3 for fn in (sdpa, triton)]
            ref = outs["sdpa"].float()
            diff = ((outs["triton"].float() - ref).abs().max() / ref.abs().max()).item()
            gb = 2 * G * Dh * dtype.itemsize * (positions + 1).sum().item() / 1e9
            programs = 2 * num_sms(device.index or 0) if device.type == "cuda" else CPU_PROGRAMS
            print(f"{b:4}{length:8}{num_splits(b, G, length, programs):8}{times[0]:10.1f}"
                  f"{times[1]:11.1f}{gb / times[0] * 1e6:11.0f}{gb / times[1] * 1e6:13.0f}"
                  f"{diff:14.2e}")


if __name__ == "__main__":
    main()
