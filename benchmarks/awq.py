"""Int4 (AWQ GEMM layout) MoE layer against the bf16 layer, side by side, at decode (1 token) and
small-batch (64 tokens) sizes; plus packed expert bytes against bf16 bytes.

    python benchmarks/awq.py [--shapes qwen3,mixtral] [--tokens 1,64] [--no-graph]
                             [--tiles 32,64,64,8,3 64,128,64,8,4 ...]

Both layers are the same `dropless.MoE` (same router weights, same routing): "bf16" holds
`Experts` (backend auto), "int4" holds `QuantizedExperts` packed from the same weights (round to
nearest, group 128). "bf16 decode" / "int4 decode" are the layers the way the inference engine
runs them (dropless/serve/moe_decode.py: no sort or plan; the Triton GEMVs for few tokens);
"bf16 kmajor decode" is "bf16 decode" on experts laid out k-major, as `dropless serve` and
`generate` load them (round 22: its GEMVs 1.27x the training layout's at batch 1), with
the default unpacking of the int32s (DROPLESS_AWQ_UNPACK=nibble); "int4 decode ilv" spreads them
over columns in registers (interleave); "int4 gather" is the int4 layer with each column loading
its own int32 (gather). Speedups: the fastest bf16 column over the fastest int4 one. Weights are
random, built on the GPU. Times are
medians (triton's do_bench, CUDA events) of a forward under no_grad, eager and replayed from a
CUDA graph of 24 calls on 24 inputs (what an inference engine runs; launch overhead dominates the
eager numbers at batch 1; times are per call). "check" is the int4 layer's relative error
against the bf16 layer holding the dequantized int4 weights (the same function).
--tiles sweeps the grouped int4 kernel's tile (BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES, through
DROPLESS_AWQ_TILE) at every T above 1: the int4 experts alone (fused path, graphed) under each
tile, against the default tile and the best bf16 experts, each checked against the default's
output. A spec may end in ":packed=MODE" (DROPLESS_AWQ_GROUPED_PACKED: 0, 1, small), or be
"packed=MODE" alone (the default tile), or "default" (the default tile and packing, =small);
specs may repeat, so that `--tiles packed=1 packed=0 packed=1` times packed against unpacked in
one process, alternating.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from dropless import MoE, MoEConfig, ops
from dropless.ops import awq as awq_ops
from dropless.quant.modules import QuantizedExperts
from dropless.ops.gemv import experts_decode
from dropless.serve.moe_decode import choose_path, kmajor_experts, moe_decode
from moe_layer import bench, commit   # the benchmarks' one timing helper (this script's folder)

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2),   # D, F, E, K
          "cpu": (128, 128, 8, 2)}   # a smoke test of this script (TRITON_INTERPRET=1 --device cpu)
GROUP = 128
CALLS = 24   # inputs per graph (each routed anew): times are per call
PROVIDERS = (("bf16", "bf16", None), ("bf16 decode", "bf16", None),
             ("bf16 kmajor decode", "bf16 kmajor", None), ("int4", "int4", None),
             ("int4 decode", "int4", None), ("int4 decode ilv", "int4", "interleave"),
             ("int4 gather", "int4", "gather"))


def graphed(fn, xs):
    """fn(x) for every x in xs, replayed from ONE CUDA graph (None when the path cannot be
    captured). Several inputs, each routed to its own experts: a graph of one call would time
    the host's launch latency with it (round 16), and repeating one input would read its experts
    from L2."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(xs[0])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x in xs:
                fn(x)
        return graph.replay
    except Exception as err:   # a host sync inside the path: report eager only
        print(f"  (no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:80]})")
        torch.cuda.synchronize()
        return None


def build(D, F, E, K, device):
    torch.manual_seed(0)
    with torch.device(device):
        bf16 = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K)).to(torch.bfloat16)
    bf16.router.weight.data.normal_(std=1.0)   # spread routing over the experts
    q = QuantizedExperts(E, D, F, GROUP, device=device)
    with torch.no_grad():
        q.gate_up.set_from(bf16.experts.gate_up)
        q.down.set_from(bf16.experts.down)
    int4, deq = copy.deepcopy(bf16), copy.deepcopy(bf16)   # the same router weights
    int4.experts = q
    deq.experts.gate_up.data = q.gate_up.dequantize(torch.bfloat16)
    deq.experts.down.data = q.down.dequantize(torch.bfloat16)
    kmajor = copy.deepcopy(bf16)   # as `dropless serve` loads bf16 experts (round 22)
    kmajor_experts(kmajor, device_types=(torch.device(device).type,))
    return bf16, kmajor, int4, deq, q


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen3,mixtral")
    parser.add_argument("--tokens", default="1,64")
    parser.add_argument("--no-graph", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiles", nargs="*", default=[],
                        help="grouped int4 tiles BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES to "
                        "sweep, each optionally :packed=MODE (or packed=MODE, default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, commit {commit()}")
    rows, swept = [], []
    for name in args.shapes.split(","):
        D, F, E, K = SHAPES[name]
        bf16, kmajor, int4, deq, q = build(D, F, E, K, device)
        bf16_bytes = (bf16.experts.gate_up.numel() + bf16.experts.down.numel()) * 2
        print(f"{name}: D={D} F={F} E={E} K={K}: experts {bf16_bytes / 2**20:.0f} MiB bf16, "
              f"{q.nbytes() / 2**20:.0f} MiB int4 ({q.nbytes() / bf16_bytes:.3f}x)")
        for T in map(int, args.tokens.split(",")):
            xs = [torch.randn(T, D, device=device, dtype=torch.bfloat16)
                  for _ in range(CALLS if device.type == "cuda" else 1)]
            x = xs[0]

            def per_call(f, inputs):   # ms per call of f over the inputs, graphed where asked
                replay = None if args.no_graph or device.type != "cuda" else graphed(f, inputs)
                return bench(replay, device) / len(inputs) if replay else bench(
                    lambda: f(inputs[0]), device)

            with torch.no_grad():
                y_q, y_d = int4(x)[0].float(), deq(x)[0].float()
                check = ((y_q - y_d).norm() / y_d.norm()).item()
                times = {}
                # (x, ids, w) per input: the experts alone run on their layer's routing
                routed = []
                for t in xs:
                    route = bf16.router(t)
                    routed.append((t, route.expert_ids_TK, route.weights_TK))
                layers = {"bf16": bf16, "bf16 kmajor": kmajor, "int4": int4}
                for label, layer, unpack in PROVIDERS:
                    layer = layers[layer]
                    os.environ[awq_ops.UNPACK_ENV] = unpack or awq_ops.UNPACKS[0]
                    fn = lambda t, layer=layer: layer(t)[0]   # noqa: E731
                    if "decode" in label:   # the engine's entry
                        fn = lambda t, m=layer: moe_decode(m, t)   # noqa: E731
                    times[label] = bench(lambda: fn(x), device)
                    times[label + " graph"] = (per_call(fn, xs) if not args.no_graph
                                               else float("nan"))
                    # the experts alone: plan, dispatch, experts, combine for bf16; int4 the way
                    # its layer runs them (decode, or the fused kernels)
                    if label.startswith("bf16") and "decode" in label:   # the engine's: by
                        path = choose_path(T, K, E, device.type)     # size, as moe_decode picks
                        if path == "triton" or device.type == "cpu":
                            def experts(r, m=layer):
                                return experts_decode(r[0], r[1], r[2], m.experts.gate_up,
                                                      m.experts.down)
                        else:
                            def experts(r, m=layer, path=path):
                                return moe_decode(m, r[0], path)
                    elif layer is bf16:
                        def experts(r, m=bf16):
                            plan = ops.make_plan(r[1], E)
                            y_RD = m.experts(ops.dispatch(r[0], plan), plan.counts_E)
                            return ops.combine(y_RD, plan, r[2])
                    elif q.decodes(x, K) or "decode" in label:
                        def experts(r, q=q):
                            return q.decode(*r)
                    else:
                        def experts(r, q=q):
                            return q.fused(r[0], ops.make_plan(r[1], E), r[2])
                    times[label + " experts"] = per_call(experts, routed)
                os.environ.pop(awq_ops.UNPACK_ENV)
                if T > 1:
                    swept += sweep(name, T, args.tiles, q, E, routed, per_call, times)
            rows.append((name, T, times, check))
        del bf16, kmajor, int4, deq, q
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\nms per MoE layer forward (median). eager / graph: the whole layer (router included),"
          " eagerly or replayed from a CUDA graph; experts: the experts alone on the layer's "
          "routing (graph). speedup = the fastest bf16 / the fastest int4.")
    kinds = ["", " graph", " experts"]
    providers = [label for label, _, _ in PROVIDERS]
    head = " ".join(f"{p + k:>19}" for k in kinds for p in providers)
    print(f"{'shape':8} {'T':>3} {head} " + " ".join(f"{'speedup' + k:>16}" for k in kinds)
          + f" {'check':>9}")
    for name, T, t, check in rows:
        cells = " ".join(f"{t[p + k]:>19.4f}" for k in kinds for p in providers)
        best = {k: tuple(min(t[p + k] for p in providers if p.startswith(kind))
                         for kind in ("bf16", "int4")) for k in kinds}
        ups = " ".join(f"{best[k][0] / best[k][1]:>15.2f}x" for k in kinds)
        print(f"{name:8} {T:>3} {cells} {ups} {check:>9.2e}")
    if swept:
        print("\nthe grouped int4 kernel's tile (fused experts, graph, ms per call); x default / "
              "x bf16: the default tile's / the best bf16 experts' time over this one; check: "
              "relative difference from the default tile's output")
        print(f"{'shape':8} {'T':>3} {'tile':>18} {'ms':>9} {'x default':>10} {'x bf16':>8} "
              f"{'check':>9}")
        for name, T, spec, ms, default, bf16, check in swept:
            print(f"{name:8} {T:>3} {spec:>18} {ms:>9.4f} {default / ms:>9.2f}x {bf16 / ms:>7.2f}x "
                  f"{check:>9.2e}")


def spec_env(spec: str) -> dict[str, str]:
    """The environment of one --tiles spec: "TILE", "TILE:packed=MODE", "packed=MODE", "default"."""
    env = {}
    for part in spec.split(":"):
        if part.startswith("packed="):
            env[awq_ops.GROUPED_PACKED_ENV] = part[len("packed="):]
        elif part != "default":
            env[awq_ops.TILE_ENV] = part
    return env


def sweep(name, T, specs, q, E, routed, per_call, times):
    """(shape, T, tile, ms, default ms, best bf16 ms, check) of the int4 experts under each tile."""
    def experts(r):
        return q.fused(r[0], ops.make_plan(r[1], E), r[2])

    with torch.no_grad():
        ref = experts(routed[0]).float()
        default = per_call(experts, routed)
        bf16 = min(times["bf16 experts"], times["bf16 decode experts"])
        out = []
        for spec in specs:
            env = spec_env(spec)
            os.environ.update(env)
            try:
                y = experts(routed[0]).float()
                check = ((y - ref).norm() / ref.norm()).item()
                ms = per_call(experts, routed)
            except Exception as err:   # a tile past the shared memory or registers
                print(f"  tile {spec}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                ms, check = float("nan"), float("nan")
            finally:
                for key in env:
                    os.environ.pop(key)
            out.append((name, T, spec, ms, default, bf16, check))
    return out


if __name__ == "__main__":
    main()
