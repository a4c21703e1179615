"""One MoE layer's experts, side by side: forward and forward+backward time, TFLOP/s, ratio to a dense
SwiGLU with the same FLOPs, and peak extra memory. Router and permutation overheads are timed apart.

    python benchmarks/moe_layer.py --device cuda --shapes mixtral,olmoe,qwen3 [--check]
    python benchmarks/moe_layer.py --device cpu --shapes cpu

Every provider gets the same routing (softmax top-k of random logits) and computes
y[t] = sum_k w[t, k] * swiglu_{e(t, k)}(x[t]); all but `hf_mixtral_block` (which routes itself) take
the routing as given. TFLOP/s counts expert FLOPs only: fwd 2*T*K*3*D*F, fwd+bwd 3x that.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dropless import ops
from dropless.ops import grouped, reference, triton_blocksparse, triton_grouped
from dropless.router import Router

SHAPES = {  # name: (T, D, F, E, K)
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "qwen3": (16384, 2048, 768, 128, 8),
    "cpu": (512, 256, 512, 8, 2),
    "cpu-fine": (512, 256, 128, 32, 8),
    "cpu-tiny": (100, 64, 96, 4, 2),   # tests/test_benchmarks.py; R = 200: not a multiple of 64
}


def commit() -> str:
    """The commit under test: .commit_under_test at the repository root where the caller wrote it
    (the device's copy of .git can be stale: round 19's awq.py log named an older commit), else
    git's HEAD, else ""."""
    root = Path(__file__).resolve().parent.parent
    written = root / ".commit_under_test"
    if written.is_file():
        return written.read_text().strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=root, timeout=10).stdout.strip()
    except OSError:
        return ""


def bench(fn, device) -> float:
    """Median milliseconds of fn() after warm-up: CUDA events through do_bench on the GPU."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


# ---- providers: f(x_TD, weights_TK, expert_ids_TK, params) -> y_TD --------------------------------

def dense_equiv(x, weights, ids, p):
    return F.linear(F.silu(F.linear(x, p["dense_gate"])) * F.linear(x, p["dense_up"]), p["dense_down"])


def _three_steps(expert_fn):
    def provider(x, weights, ids, p):
        plan = ops.make_plan(ids, p["gate_up"].shape[0])
        y_RD = expert_fn(ops.dispatch(x, plan), plan.counts_E, p["gate_up"], p["down"])
        return ops.combine(y_RD, plan, weights)
    return provider


def _grouped_autograd(x_RD, counts_E, gate_up_EDF2, down_EFD):
    """Round 1's grouped experts: plain autograd through grouped_mm (keeps silu(g), u and h too)."""
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    g, u = torch._grouped_mm(x_RD, gate_up_EDF2, offs=offs_E).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(g) * u, down_EFD, offs=offs_E)


def grouped_fused(x, weights, ids, p):
    """The layer's default dropless path since round 3: gather + experts + K-sum, weights folded in."""
    plan = ops.make_plan(ids, p["gate_up"].shape[0])
    return grouped.fused_experts(x, plan, weights, p["gate_up"], p["down"])


def grouped_mm_round1(x, weights, ids, p):
    """Round 1's default path: counts by torch.bincount (a host sync on CUDA), autograd experts,
    the reference dispatch and combine (slot-order copy, batched matmul)."""
    plan = ops.make_plan(ids, p["gate_up"].shape[0])
    plan.counts_E = torch.bincount(ids.reshape(-1), minlength=p["gate_up"].shape[0])
    y_RD = _grouped_autograd(reference.dispatch(x, plan), plan.counts_E, p["gate_up"], p["down"])
    return reference.combine(y_RD, plan, weights)


def capacity_bmm(x, weights, ids, p, factor=1.25):
    """GShard-style baseline: every expert padded to C = ceil(factor*T*K/E) rows, one bmm each."""
    E = p["gate_up"].shape[0]
    T, K = ids.shape
    C = math.ceil(factor * T * K / E)
    plan = ops.make_plan(ids, E, C)
    expert_of_row = ids.reshape(-1)[plan.slot_of_row_R]
    starts_E = torch.cumsum(plan.counts_E, 0) - plan.counts_E
    rank_R = torch.arange(expert_of_row.numel(), device=x.device) - starts_E[expert_of_row]
    dest_R = expert_of_row * C + rank_R
    x_ECD = x.new_zeros(E * C, x.shape[1]).index_put((dest_R,), ops.dispatch(x, plan))
    g, u = torch.bmm(x_ECD.view(E, C, -1), p["gate_up"]).chunk(2, dim=-1)
    y_ECD = torch.bmm(F.silu(g) * u, p["down"]).view(E * C, -1)
    return ops.combine(y_ECD[dest_R], plan, weights)


def fused_triton(x, weights, ids, p):
    plan = ops.make_plan(ids, p["gate_up"].shape[0])
    return triton_grouped.fused_experts(x, plan, weights, p["gate_up"], p["down"])


def blocksparse(x, weights, ids, p):
    plan = ops.make_plan(ids, p["gate_up"].shape[0])
    return triton_blocksparse.blocksparse_experts(x, plan, weights, p["gate_up"], p["down"])


def hf_block(T, D, Fh, E, K, dtype, device):
    """The transformers Mixtral sparse block (routes itself), grouped_mm experts where offered."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=Fh, num_local_experts=E,
                            num_experts_per_tok=K, experts_implementation="grouped_mm")
        block = MixtralSparseMoeBlock(cfg).to(device, dtype)
    except Exception as err:   # optional provider: any import/config mismatch just skips it
        print(f"# hf_mixtral_block skipped: {type(err).__name__}: {err}")
        return None
    return lambda x, weights, ids, p: block(x.unsqueeze(0))[0].squeeze(0), list(block.parameters())


def providers(device):
    out = {"dense_equiv": dense_equiv,
           "reference_loop": _three_steps(reference.swiglu_loop),
           "grouped_mm_round1": grouped_mm_round1,
           "grouped_mm": _three_steps(grouped.swiglu_grouped),
           "grouped_fused": grouped_fused,
           "capacity_bmm_1.25": capacity_bmm}
    if triton_grouped.supports(torch.empty(0, device=device, dtype=torch.bfloat16)):
        out["fused_triton"] = fused_triton
        out["blocksparse"] = blocksparse
    return out


# ---- one shape ------------------------------------------------------------------------------------

def make_inputs(T, D, Fh, E, K, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    x = randn(T, D)
    weights, ids = torch.randn(T, E, generator=gen, device=device).softmax(-1).topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    p = {"gate_up": randn(E, D, 2 * Fh, std=D ** -0.5), "down": randn(E, Fh, D, std=Fh ** -0.5),
         "dense_gate": randn(K * Fh, D, std=D ** -0.5), "dense_up": randn(K * Fh, D, std=D ** -0.5),
         "dense_down": randn(D, K * Fh, std=(K * Fh) ** -0.5)}
    return x, weights, ids, {k: v.requires_grad_() for k, v in p.items()}


def run_shape(name, dtype, device, check, profile, only=None):
    T, D, Fh, E, K = SHAPES[name]
    x, weights, ids, p = make_inputs(T, D, Fh, E, K, dtype, device)
    x.requires_grad_()
    weights.requires_grad_()
    dy = torch.randn_like(x)
    flops = 2 * T * K * 3 * D * Fh
    table = {}
    provs = {k: (fn, None) for k, fn in providers(device).items()}
    hf = hf_block(T, D, Fh, E, K, dtype, device) if only is None or "hf_mixtral_block" in only else None
    if hf is not None:
        provs["hf_mixtral_block"] = hf
    if only is not None:
        provs = {k: v for k, v in provs.items() if k in only or k == "dense_equiv"}
    y_check = None
    for label, (fn, params) in provs.items():
        leaves = [x, weights] + (params if params is not None else
                                 ([p["dense_gate"], p["dense_up"], p["dense_down"]]
                                  if label == "dense_equiv" else [p["gate_up"], p["down"]]))
        leaves = [t for t in leaves if t.requires_grad]
        fwd = lambda: fn(x, weights, ids, p)  # noqa: E731

        def fwd_bwd():
            y = fn(x, weights, ids, p)
            return torch.autograd.grad(y, leaves, dy, allow_unused=True)
        try:
            with torch.no_grad():
                t_fwd = bench(fwd, device)
            t_fb = bench(fwd_bwd, device)
            # activations only: the weight gradients (E*D*3F against the dense K*F*3D) are not
            weight_grads = sum(t.numel() * t.element_size() for t in leaves[2:]) / 2**30
            mem = peak_extra_gib(fwd_bwd, device) - weight_grads
        except torch.OutOfMemoryError:
            print(f"# {label}: out of memory")
            continue
        table[label] = (t_fwd, t_fb, mem)
        if profile and label in ("grouped_mm", "grouped_fused", "blocksparse", "dense_equiv"):
            print_kernel_times(label, fwd_bwd, t_fb)
        if check and label not in ("dense_equiv", "hf_mixtral_block", "capacity_bmm_1.25"):
            y_check = check_against(label, fn, x, weights, ids, p, dy, y_check)
    # router and permutation overheads, apart from the experts
    router = Router(_router_cfg(D, E, K)).to(device)
    t_router = bench(lambda: router(x.detach()), device)
    t_plan = bench(lambda: ops.make_plan(ids, E), device)
    counts_E = ops.expert_counts(ids, E)
    t_tiles = bench(lambda: triton_grouped.tile_map(counts_E, T * K), device)
    t_topo = bench(lambda: triton_blocksparse.topology(counts_E, T * K), device)
    print_table(name, (T, D, Fh, E, K), dtype, device, table, flops)
    print(f"overheads: router (logits, softmax, top-k, losses) {t_router:.3f} ms; "
          f"make_plan (argsort, counts, inverse) {t_plan:.3f} ms; "
          f"fused tile map {t_tiles:.3f} ms; block-sparse topology {t_topo:.3f} ms\n")


def _router_cfg(D, E, K):
    from dropless.config import MoEConfig
    return MoEConfig(dim=D, hidden_dim=1, num_experts=E, top_k=K)


def check_against(label, fn, x, weights, ids, p, dy, prev):
    """Relative error of y and every gradient against the fp32 loop (float64 is too slow here)."""
    if prev is None:
        up = [t.detach().float().requires_grad_() for t in (x, weights, p["gate_up"], p["down"])]
        y = reference.moe_loop(up[0], up[1], ids, up[2], up[3])
        prev = (y.detach(), torch.autograd.grad(y, up, dy.float()))
    y_ref, g_ref = prev
    if x.device.type == "cuda":   # poison the caching allocator (on the CPU: 1 GiB for nothing)
        torch.empty(1 << 28, device=x.device).fill_(float("nan"))
    y = fn(x, weights, ids, p)
    grads = torch.autograd.grad(y, (x, weights, p["gate_up"], p["down"]), dy)
    errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((y, *grads), (y_ref, *g_ref))]
    print(f"# check {label}: rel err y, dx, dw, dgate_up, ddown = "
          + ", ".join(f"{e:.1e}" for e in errs))
    return prev


def print_kernel_times(label, fn, measured_ms):
    """CUDA kernel times of one fwd+bwd, and their sum against the measured time: the difference is
    time the GPU sat idle (host overhead, syncs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"# profile {label}: kernels {kernel_ms:.3f} ms of {measured_ms:.3f} ms measured "
          f"(idle {measured_ms - kernel_ms:.3f} ms)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=70))


def print_table(name, shape, dtype, device, table, flops):
    T, D, Fh, E, K = shape
    print(f"\n### {name}: T {T}, D {D}, F {Fh}, E {E}, K {K}, {str(dtype)[6:]}, {device}\n")
    print("| provider | fwd ms | fwd TFLOP/s | fwd ratio | fwd+bwd ms | fwd+bwd TFLOP/s | "
          "fwd+bwd ratio | peak activations GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = table.get("dense_equiv")
    for label, (tf, tfb, mem) in table.items():
        print(f"| {label} | {tf:.3f} | {flops / tf / 1e9:.3g} | {dense[0] / tf:.2f} | {tfb:.3f} | "
              f"{3 * flops / tfb / 1e9:.3g} | {dense[1] / tfb:.2f} | {mem:.2f} | "
              f"{mem / dense[2]:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU)")
    parser.add_argument("--check", action="store_true", help="compare with the fp32 loop first")
    parser.add_argument("--providers", default=None, help="comma list (dense_equiv always runs)")
    parser.add_argument("--profile", action="store_true",
                        help="GPU kernel times (grouped_mm, grouped_fused, blocksparse, dense)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = args.shapes or ("mixtral,olmoe,qwen3" if device.type == "cuda" else "cpu,cpu-fine")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    for name in shapes.split(","):
        run_shape(name, dtype, device, args.check, args.profile,
                  args.providers and args.providers.split(","))
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
