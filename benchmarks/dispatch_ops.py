"""The permutation around the experts, op by op and in the layer (CUDA): the plan's sort with int64
keys against the narrowed keys `make_plan` sorts, the dispatch gather (`x[idx]`, `index_select`),
the K-sum, and a copy of the gathered rows for scale; then fwd+bwd of grouped_fused and grouped_mm
(`moe_layer.py`'s providers) with either sort key (int64 keys were the plan's before round 35),
against the dense SwiGLU of equal FLOPs, medians of alternating runs. (Round 36 timed a Triton
gather kernel here too: within 3% of indexing, both at copy speed, no gain in the layer; removed.)

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


def configure(narrow: bool) -> None:
    """The plan's sort key narrowed (as landed) or int64."""
    reference.sort_key_dtype = REAL_KEY if narrow else (lambda num_experts: torch.int64)


def ops_table(name: str) -> None:
    (T, D, E, K), (x, w, ids, p) = inputs(name)
    flat = ids.reshape(-1)
    print(f"\n### {name}: ops (T {T}, D {D}, E {E}, K {K}, R {T * K})\n")
    print("| op | us |\n|---|---|")
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        print(f"| stable argsort of {str(dtype)[6:]} ids | "
              f"{us(lambda: torch.argsort(flat.to(dtype), stable=True)):.1f} |")
    for narrow in (False, True):
        configure(narrow)
        print(f"| make_plan, {'narrowed' if narrow else 'int64'} keys | "
              f"{us(lambda: ops.make_plan(ids, E)):.1f} |")
    configure(True)   # the default, for the rest
    plan = ops.make_plan(ids, E)
    tok = plan.slot_of_row_R // K
    want = x[tok]
    print(f"| gather: x[idx] | {us(lambda: x[tok]):.1f} |")
    print(f"| gather: index_select | {us(lambda: torch.index_select(x, 0, tok)):.1f} |")
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
        runs.setdefault(("dense_equiv", None), []).append(us(fwd_bwd("dense_equiv")))
        for narrow in (False, True):
            configure(narrow)
            for label in ("grouped_fused", "grouped_mm"):
                runs.setdefault((label, narrow), []).append(us(fwd_bwd(label)))
    configure(True)   # the default again
    dense = statistics.median(runs[("dense_equiv", None)])
    print(f"\n### {name}: fwd+bwd, median of {repeats}\n")
    print("| provider | sort keys | us | ratio to dense | runs |")
    print("|---|---|---|---|---|")
    for (label, narrow), times in runs.items():
        m = statistics.median(times)
        keys = "-" if narrow is None else "narrowed" if narrow else "int64"
        print(f"| {label} | {keys} | {m:.0f} | {dense / m:.3f} | "
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
