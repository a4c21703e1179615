"""Group-wise asymmetric int4 weights in AutoAWQ's "GEMM" layout: packing, round-to-nearest
quantization and the plain-PyTorch dequantization (the CPU path and the test oracle).

Legend: I input features, O output features, G groups along the input (I / group_size), ... any
leading dims (E experts).

Layout of one linear y = x @ W, W [I, O] (the transpose of nn.Linear's weight):
  qweight int32 [..., I, O/8]   eight 4-bit codes per int32
  qzeros  int32 [..., G, O/8]   the zero point of every (group, output column), packed the same way
  scales  fp16  [..., G, O]
  W[i, o] = (q[i, o] - z[i // group, o]) * s[i // group, o]
Inside one int32, bits 4j..4j+3 hold column AWQ_ORDER[j] of its run of eight columns: the order
AutoAWQ's GEMM kernels read. Unpacking reads column c from nibble AWQ_UNPACK[c].
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS                      # codes per int32
QMAX = 2**BITS - 1
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble j holds column AWQ_ORDER[j]
AWQ_UNPACK = (0, 4, 1, 5, 2, 6, 3, 7)  # column c sits in nibble AWQ_UNPACK[c]
GROUP_SIZES = (32, 64, 128)


def check_shape(in_features: int, out_features: int, group_size: int, what: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is invalid: allowed: {GROUP_SIZES}")
    if in_features % group_size:
        raise ValueError(f"{what}: input features {in_features} are not a multiple of "
                         f"group_size={group_size}")
    if out_features % PACK:
        raise ValueError(f"{what}: output features {out_features} are not a multiple of {PACK}")


def pack(q: torch.Tensor) -> torch.Tensor:
    """int codes in [0, 15], [..., O] -> int32 [..., O/8] in AutoAWQ's nibble order."""
    q = q.to(torch.int32)
    runs = q.reshape(*q.shape[:-1], q.shape[-1] // PACK, PACK)
    packed = torch.zeros(runs.shape[:-1], dtype=torch.int32, device=q.device)
    for j, col in enumerate(AWQ_ORDER):
        # the top nibble sets the sign bit: int32 shifts wrap as two's complement, as intended
        packed |= runs[..., col] << (BITS * j)
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., O/8] -> int32 codes [..., O] in [0, 15]."""
    shifts = torch.tensor([BITS * AWQ_UNPACK[c] for c in range(PACK)], dtype=torch.int32,
                          device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & QMAX
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * PACK)


def quantize(w: torch.Tensor, group_size: int, max_abs: torch.Tensor | None = None):
    """Round-to-nearest, asymmetric, per (group, output column). w [..., I, O] (float).
    `max_abs` [..., G, O] clips every group to [-max_abs, max_abs] first (the AWQ clip search's
    result). -> (codes int32 [..., I, O], zeros int32 [..., G, O], scales float32 [..., G, O])."""
    *lead, I, O = w.shape
    w_g = w.float().reshape(*lead, I // group_size, group_size, O)
    if max_abs is not None:
        w_g = torch.maximum(torch.minimum(w_g, max_abs.unsqueeze(-2)), -max_abs.unsqueeze(-2))
    # the range always holds 0, so that the zero point is a code in [0, 15] (a group of all-positive
    # weights would otherwise clamp its zero point and lose its top)
    lo, hi = w_g.amin(-2).clamp(max=0), w_g.amax(-2).clamp(min=0)
    # round the scale to fp16 first: codes and zeros are then exact for the stored scale
    scales = ((hi - lo).clamp(min=1e-5) / QMAX).half().float()
    zeros = (-lo / scales).round().clamp(0, QMAX)
    codes = (w_g / scales.unsqueeze(-2)).round() + zeros.unsqueeze(-2)
    codes = codes.clamp(0, QMAX).reshape(*lead, I, O)
    return codes.to(torch.int32), zeros.to(torch.int32), scales


def fake_quantize(w: torch.Tensor, group_size: int, max_abs: torch.Tensor | None = None):
    """quantize then dequantize, in float32: what the int4 weight computes."""
    codes, zeros, scales = quantize(w, group_size, max_abs)
    return _dequant_codes(codes, zeros, scales, group_size)


def _dequant_codes(codes, zeros, scales, group_size: int) -> torch.Tensor:
    z = zeros.repeat_interleave(group_size, dim=-2).float()
    s = scales.repeat_interleave(group_size, dim=-2).float()
    return (codes.float() - z) * s


def quantize_packed(w: torch.Tensor, group_size: int, max_abs: torch.Tensor | None = None):
    """w [..., I, O] -> (qweight, qzeros, scales fp16) in the GEMM layout."""
    *_, I, O = w.shape
    check_shape(I, O, group_size)
    codes, zeros, scales = quantize(w, group_size, max_abs)
    return pack(codes), pack(zeros), scales.half()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The GEMM layout -> W [..., I, O] in `dtype` (group size read off the shapes)."""
    group_size = qweight.shape[-2] // qzeros.shape[-2]
    w = _dequant_codes(unpack(qweight), unpack(qzeros), scales, group_size)
    return w.to(dtype)
