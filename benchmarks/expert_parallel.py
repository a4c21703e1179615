"""Expert parallelism, side by side in one run: the EP layer against the single-process layer, and its
dispatch + combine against a raw all_to_all_single of the same bytes.

    torchrun --nproc-per-node N benchmarks/expert_parallel.py [--shapes olmoe,qwen3] [--tokens T]

With `--tokens` fixed (tokens per GPU), each rank holds E/N experts and the same expert work as one
process holding all E experts on the same tokens, so the EP layer's time should equal that
single-process layer's, timed in the same run: their ratio is the weak-scaling efficiency (N = 1
shows the dispatcher's own overhead). At every N the script first checks the EP layer against one
process computing this rank's tokens with all experts (forward output), then times with CUDA events
(or perf_counter on CPU), medians over repeats after warm-up, on random data. The raw all-to-alls
are timed twice: with the dispatcher's own splits (the same bytes: one row per token and
destination rank) and with one row per (token, expert) slot. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist

from dropless import MoE, MoEConfig
from dropless.parallel import ParallelConfig, build_mesh
from dropless.parallel.expert_parallel import apply_ep

SHAPES = {  # D, F, E, K of the anchor shapes (ANCHORS.md)
    "olmoe": (2048, 1024, 64, 8),
    "qwen3": (2048, 768, 128, 8),
    "tiny": (256, 128, 16, 2),
}


def timed(fn, device, warmup=3, reps=10) -> float:
    """Median milliseconds of fn() over `reps`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_shape(name, T, device, dtype, world, rank):
    D, F, E, K = SHAPES[name]
    cfg = MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K)
    torch.manual_seed(0)
    local = MoE(cfg).to(device, dtype)
    mesh = build_mesh(ParallelConfig(ep=world), device.type)
    ep = apply_ep(copy.deepcopy(local), mesh)
    torch.manual_seed(1 + rank)   # each rank reads its own tokens
    x = torch.randn(T, D, device=device, dtype=dtype)

    # 1. correctness: this rank's tokens through EP equal the single-process layer
    with torch.no_grad():
        y_ep, _ = ep(x)
        y_ref, _ = local(x)
    err = float((y_ep.float() - y_ref.float()).norm() / y_ref.float().norm())

    # 2. dispatch + combine alone, forward: rows out to their experts' ranks and back
    route = ep.router(x)
    disp = ep.dispatcher

    def dispatch_combine():
        x_RD, plan = disp.dispatch(x, route.expert_ids_TK, route.weights_TK)
        disp.combine(x_RD, plan, route.weights_TK)

    ms_dc = timed(dispatch_combine, device)
    _, plan = disp.dispatch(x, route.expert_ids_TK, route.weights_TK)
    rows_sent = sum(plan.send_splits)

    # 3. raw all_to_all_single there and back: (a) the same bytes this dispatcher moves (the same
    #    uneven splits), (b) one row per (token, expert) slot, T*K rows (a dispatcher without
    #    per-rank deduplication), even splits
    def raw_fn(send_splits, recv_splits):
        send = torch.randn(sum(send_splits), D, device=device, dtype=dtype)
        recv = torch.empty(sum(recv_splits), D, device=device, dtype=dtype)

        def raw():
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
            dist.all_to_all_single(send, recv, send_splits, recv_splits)
        return raw

    ms_raw = timed(raw_fn(plan.send_splits, plan.recv_splits), device)
    even = [T * K // world] * world
    ms_raw_slots = timed(raw_fn(even, even), device)

    # 4. the whole layer, forward + backward: EP, and one process holding all experts on the same
    #    tokens (the same work per GPU: their ratio is the weak-scaling efficiency)
    xg = x.clone().requires_grad_()

    def layer(moe):
        def run():
            y, aux = moe(xg)
            (y.float().square().mean() + aux.balance_loss).backward()
        return run

    ms_layer = timed(layer(ep), device)
    ms_local = timed(layer(local), device)
    gbytes = 2 * rows_sent * D * x.element_size() / 1e9
    return dict(shape=name, world=world, tokens=T, rows_per_token=rows_sent / T, rel_err=err,
                dc_ms=ms_dc, raw_ms=ms_raw, raw_gbps=gbytes / ms_raw * 1e3, raw_slots_ms=ms_raw_slots,
                layer_ms=ms_layer, local_ms=ms_local)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="olmoe,qwen3")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    args = parser.parse_args()
    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(key, value)   # the GPU machines require NVLink multicast off
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = [run_shape(name, args.tokens, device, dtype, world, rank)
            for name in args.shapes.split(",")]
    if rank == 0:
        print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, world {world}, "
              f"torch {torch.__version__}, {dtype}; rank 0's numbers, medians")
        print("| shape | EP | tokens/GPU | rows sent/token | rel err vs 1 process | "
              "dispatch+combine ms | raw a2a, same bytes ms (GB/s) | ratio | raw a2a, T*K rows ms | "
              "layer fwd+bwd EP ms | 1 process ms | weak scaling |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['world']} | {r['tokens']} | {r['rows_per_token']:.2f} | "
                  f"{r['rel_err']:.1e} | {r['dc_ms']:.3f} | {r['raw_ms']:.3f} ({r['raw_gbps']:.0f}) | "
                  f"{r['raw_ms'] / r['dc_ms']:.2f} | {r['raw_slots_ms']:.3f} | {r['layer_ms']:.2f} | "
                  f"{r['local_ms']:.2f} | {r['local_ms'] / r['layer_ms']:.2f} |")
    import gc
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
