"""PyTorch's SDPA backends at a preset's training attention shape, forward + backward, side by side.

    python benchmarks/attention.py --preset medium          # H200: flash, cuDNN, mem-efficient
    python benchmarks/attention.py --preset tiny --device cpu --batch 2   # smoke test (math only)

Causal grouped-query attention as `dropless.model.Attention` calls it (q [B, H, T, Dh], k and v
[B, G, T, Dh], enable_gqa), random bf16 inputs. Each backend is timed on the same inputs and
compared with the first one that runs: the largest difference of the output and of the three
input gradients, relative to the largest magnitude. A backend that rejects the inputs says why.
FLOPs: 4 * B * H * T^2 * Dh / 2 forward (causal), 2.5x that backward.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dropless import get_preset
from dropless.model import causal_attention
from moe_layer import bench   # the benchmarks' one timing helper (this script's folder)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, help="default: the preset's max_seq_len")
    ap.add_argument("--backends", default="flash,cudnn,efficient")
    args = ap.parse_args()
    cfg, device = get_preset(args.preset), torch.device(args.device)
    B, T = args.batch, args.seq or cfg.max_seq_len
    H, G, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, n, T, Dh, device=device, dtype=dtype, generator=g,
                           requires_grad=True) for n in (H, G, G))
    dout = torch.randn(B, H, T, Dh, device=device, dtype=dtype, generator=g)
    fwd_flop = 4 * B * H * T * T * Dh / 2
    print(f"{args.preset}: B {B}, T {T}, heads {H} / kv {G}, head_dim {Dh}, {dtype}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}")
    print(f"{'backend':12}{'fwd ms':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'max rel diff':>14}")
    first = None
    names = args.backends.split(",") if device.type == "cuda" else ["math"]
    model_fn = torch.compile(causal_attention, fullgraph=True)
    for name in names + ["dropless", "dropless compiled"]:
        def fwd():
            if name.startswith("dropless"):   # what the model runs, eager and compiled
                fn = model_fn if name.endswith("compiled") else causal_attention
                return fn(q, k, v, enable_gqa=G != H)
            with sdpa_kernel(BACKENDS[name]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G != H)

        def step():
            q.grad = k.grad = v.grad = None
            fwd().backward(dout)

        try:
            step()
        except RuntimeError as e:   # the backend rejects these inputs
            print(f"{name:12}  not run: {str(e).splitlines()[0][:100]}")
            continue
        outs = [fwd().detach()] + [t.grad.clone() for t in (q, k, v)]
        if first is None:
            first, diff = outs, 0.0
        else:
            diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                       for a, b in zip(outs, first))
        f_ms, s_ms = bench(fwd, device), bench(step, device)
        print(f"{name:12}{f_ms:9.3f}{s_ms:12.3f}{3.5 * fwd_flop / s_ms / 1e9:9.0f}{diff:14.2e}")


if __name__ == "__main__":
    main()
