"""The decode step's router, side by side: route's torch ops and the two Triton kernels
(dropless/ops/triton_router.py), at a preset's router shape, timed inside a CUDA graph (a decode
step is launch-bound; outside a graph the launches' host time would dominate both).

    python benchmarks/router.py --preset qwen3-30b-a3b                  # H200, bf16
    TRITON_INTERPRET=1 python benchmarks/router.py --preset tiny --device cpu --tokens 1 3
                                                                        # smoke test, interpreted

Per token count: each provider's median microseconds per call and whether its routing agrees with
the torch ops' (the same set of experts per token, weights matched by id within 1e-5).
"""

from __future__ import annotations

import argparse
import datetime

import torch

from dropless import get_preset
from dropless.ops.triton_router import route_topk
from dropless.router import Router
from dropless.serve import moe_decode
from moe_layer import bench, commit   # the benchmarks' one timing helper (this script's folder)


def torch_ops(router, x_TD):
    fused, moe_decode.fused_router = moe_decode.fused_router, lambda x: False
    try:
        return moe_decode.route(router, x_TD)
    finally:
        moe_decode.fused_router = fused


def kernels(router, x_TD):
    cfg = router.cfg
    return route_topk(x_TD, router.weight, cfg.top_k, cfg.norm_topk_prob, cfg.route_scale)


def agrees(out, ref) -> bool:
    (w, ids), (w_ref, ids_ref) = out, ref
    ids_s, order = ids.sort(-1)
    ref_s, ref_order = ids_ref.sort(-1)
    return torch.equal(ids_s, ref_s) and torch.allclose(
        w.gather(1, order), w_ref.gather(1, ref_order), rtol=1e-5, atol=1e-6)


def graph_us(fn, device) -> float:
    """Median microseconds of one fn() replayed from a CUDA graph of 100 calls (CPU: eager)."""
    if device.type != "cuda":
        return bench(fn, device) * 1e3
    fn()   # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(100):
            fn()
    return bench(graph.replay, device) * 1e3 / 100


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    args = ap.parse_args()
    cfg, device = get_preset(args.preset).moe, torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    router = Router(cfg).to(device, dtype).requires_grad_(False)
    print(f"{args.preset}: D {cfg.dim}, E {cfg.num_experts}, K {cfg.top_k}, {dtype}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, commit {commit()}, {datetime.date.today()}")
    print(f"{'T':>4}{'torch us':>10}{'triton us':>11}  agrees")
    with torch.no_grad():
        for T in args.tokens:
            x_TD = torch.randn(T, cfg.dim, device=device, dtype=dtype)
            ref = torch_ops(router, x_TD)
            ok = agrees(kernels(router, x_TD), ref)
            t_torch = graph_us(lambda: torch_ops(router, x_TD), device)
            t_triton = graph_us(lambda: kernels(router, x_TD), device)
            print(f"{T:4d}{t_torch:10.2f}{t_triton:11.2f}  {ok}")


if __name__ == "__main__":
    main()
