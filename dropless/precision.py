"""How a run uses its device: which device, numeric precision (what `--precision` means), whether
it compiles, and the GPU peak that MFU divides by.

fp32: everything in float32. bf16-mixed: float32 master weights, gradients and AdamW state, bf16
products under autocast (the grouped experts cast at the op as F.linear does; the router's logits
stay float32 by the layer contract). bf16: parameters and AdamW state in bf16 (buffers such as the
router's bias stay float32); the fastest, but an update smaller than bf16's resolution of a weight
(1/256 of its magnitude) is lost, so long runs at small learning rates drift from bf16-mixed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from dropless.errors import DroplessError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DroplessError(f"--device {name!r} is not a device (try cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):   # meta holds no data; nothing here targets mps, xpu
        raise DroplessError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DroplessError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_compile(compile: bool | None, device: torch.device, world: int) -> bool:
    """--compile / --no-compile, or by default (None): on for one CUDA process (the loss and the
    model as one graph: ~1.25x the eager step at medium, after ~16 s of compilation), off on the
    CPU (compilation outlasts short runs) and under torchrun (collectives inside the graph are not
    tested compiled)."""
    if compile is not None:
        return compile
    return device.type == "cuda" and world == 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16-mixed on CUDA, fp32 elsewhere (bf16 autocast on a CPU is slower than fp32
    for most ops; ask for it explicitly)."""
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device):
    """bf16-mixed autocasts to bf16 (what it covers: see above); fp32 and bf16 need none."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, torch.bfloat16)
    return nullcontext()


# dense bf16 tensor-core peak (FLOP/s, datasheet, no sparsity) by device name: the MFU divisor
_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "B200": 2250e12}


def bf16_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _BF16_PEAK.items() if key in name.split()), None)
