"""The permutation around the experts, op by op and in the layer (CUDA): the plan's sort with int64
keys against the narrowed keys `make_plan` sorts, the dispatch gather as PyTorch indexing against
the Triton kernel (`triton_combine.gather_rows`, 1-8 rows a program), the K-sum, and a 512 MiB copy
for scale; then fwd+bwd of grouped_fused and grouped_mm (`moe_layer.py`'s providers) with either
choice both ways (int64 keys were the plan's before round 35; the kernel gathers only where
`triton_combine.GATHER_KERNEL` is set, off by default until this script has run on a GPU),
against the dense SwiGLU of equal FLOPs, medians of alternating runs.

    python benchmarks/dispatch_ops.py [--shapes olmoe,qwen3] [--repeats 3]
    TRITON_INTERPRET=1 python benchmarks/dispatch_ops.py --device cpu --shapes cpu-tiny

On the CPU (fp32) the layer takes no Triton kernel: only the sort key differs there.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import moe_layer
from dropless import ops
from dropless.ops import reference, triton_combine

REAL_KEY = reference.sort_key_dtype


DEVICE = torch.device("cpu")


def us(fn) -> float:
    return moe_layer.bench(fn, DEVICE) * 1e3


def inputs(name):
    T, D, Fh, E, K = moe_layer.SHAPES[name]
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    return (T, D, E, K), moe_layer.make_inputs(T, D, Fh, E, K, dtype, DEVICE)


def configure(narrow: bool, kernel: bool) -> None:
    """The plan's sort key narrowed (as landed) or int64, the gather by the kernel or indexing."""
    reference.sort_key_dtype = REAL_KEY if narrow else (lambda num_experts: torch.int64)
    triton_combine.GATHER_KERNEL = kernel


def ops_table(name: str) -> None:
    (T, D, E, K), (x, w, ids, p) = inputs(name)
    flat = ids.reshape(-1)
    print(f"\n### {name}: ops (T {T}, D {D}, E {E}, K {K}, R {T * K})\n")
    print("| op | us |\n|---|---|")
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        print(f"| stable argsort of {str(dtype)[6:]} ids | "
              f"{us(lambda: torch.argsort(flat.to(dtype), stable=True)):.1f} |")
    for narrow in (False, True):
        configure(narrow, False)
        print(f"| make_plan, {'narrowed' if narrow else 'int64'} keys | "
              f"{us(lambda: ops.make_plan(ids, E)):.1f} |")
    plan = ops.make_plan(ids, E)
    tok = plan.slot_of_row_R // K
    want = x[tok]
    print(f"| gather: x[idx] | {us(lambda: x[tok]):.1f} |")
    print(f"| gather: index_select | {us(lambda: torch.index_select(x, 0, tok)):.1f} |")
    for rows in (1, 2, 4, 8):
        assert torch.equal(triton_combine.gather_rows(x, tok, rows), want)
        print(f"| gather: Triton, {rows} row{'s' * (rows > 1)} a program | "
              f"{us(lambda: triton_combine.gather_rows(x, tok, rows)):.1f} |")
    ones = want.new_ones(T, K)
    ksum = us(lambda: triton_combine._launch_combine(want, ones, plan.row_of_slot_S, None))
    print(f"| K-sum (combine kernel) | {ksum:.1f} |")
    mib = want.numel() * want.element_size() / 2**20
    print(f"| copy of x_RD ({mib:.0f} MiB) | {us(lambda: want.clone()):.1f} |")


def layer_table(name: str, repeats: int) -> None:
    (T, D, E, K), (x, w, ids, p) = inputs(name)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn_like(x)
    provs = moe_layer.providers(x.device)

    def fwd_bwd(label):
        leaves = ([x, w, p["dense_gate"], p["dense_up"], p["dense_down"]] if label == "dense_equiv"
                  else [x, w, p["gate_up"], p["down"]])
        return lambda: torch.autograd.grad(provs[label](x, w, ids, p), leaves, dy,
                                           allow_unused=True)   # dense takes no routing weight

    runs: dict = {}
    for _ in range(repeats):   # alternating: drift hits every configuration alike
        runs.setdefault(("dense_equiv", True, True), []).append(us(fwd_bwd("dense_equiv")))
        for narrow, kernel in ((False, False), (True, False), (False, True), (True, True)):
            configure(narrow, kernel)
            for label in ("grouped_fused", "grouped_mm"):
                runs.setdefault((label, narrow, kernel), []).append(us(fwd_bwd(label)))
    configure(True, False)   # the defaults
    dense = statistics.median(runs[("dense_equiv", True, True)])
    print(f"\n### {name}: fwd+bwd, median of {repeats}\n")
    print("| provider | sort keys | gather | us | ratio to dense | runs |")
    print("|---|---|---|---|---|---|")
    for (label, narrow, kernel), times in runs.items():
        m, dense_row = statistics.median(times), label == "dense_equiv"
        keys, gather = ("-", "-") if dense_row else ("narrowed" if narrow else "int64",
                                                     "Triton" if kernel else "index")
        print(f"| {label} | {keys} | {gather} | {m:.0f} | {dense / m:.3f} | "
              f"{', '.join(f'{t:.0f}' for t in times)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="olmoe,qwen3")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, commit {moe_layer.commit()}")
    for name in args.shapes.split(","):
        ops_table(name)
        layer_table(name, args.repeats)


if __name__ == "__main__":
    main()
