"""The SwiGLU elementwise stage as Triton kernels (CUDA): h = silu(g) * u and its backward.

Legend: R rows, N hidden columns. g and u are the two halves of each row of gu [R, 2N]: strided
views, which PyTorch's elementwise kernels read without vector loads (~2x slower than the bandwidth
allows, and the backward takes five such passes). Here the forward is one pass and the backward
(which also recomputes h for the down projection's weight gradient) is another. Used inside the
grouped and block-sparse autograd functions, which own the differentiation: no custom op needed.
"""

from __future__ import annotations


import torch
from torch import Tensor

BLOCK = 1024


def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_swiglu_kernels
    return triton_swiglu_kernels


def swiglu(gu_R2N: Tensor, w_R: Tensor | None = None) -> Tensor:
    """h_RN = silu(g) * u for contiguous gu_R2N = [g | u]; times w_R per row when given (the
    routing weights, in gu's dtype: h is rounded before the product, as h.mul_(w) rounds)."""
    R, N = gu_R2N.shape[0], gu_R2N.shape[1] // 2
    h = gu_R2N.new_empty(R, N)
    _kernels().swiglu_kernel[(max(1, -(-R * N // BLOCK)),)](
        gu_R2N, h if w_R is None else w_R.contiguous(), h, N, R * N, HAS_W=w_R is not None,
        BLOCK=BLOCK)
    return h


def swiglu_weighted_backward(gu_R2N: Tensor, dhw_RN: Tensor, w_R: Tensor,
                             want_dgu: bool = False):
    """For y = (w * h) @ down and dh' = dy @ down^T (dhw_RN, contiguous): returns (hw_RN = w * h
    for d(down), dw_R = <dh', h> per row), dhw_RN overwritten with dh = w * dh'. One pass over
    [g | u] and dh' in place of the five PyTorch passes of the same rounding steps. With
    `want_dgu`, (hw_RN, dw_R, d[g | u]_R2N), swiglu_backward's from dh in the same pass, hw
    written over dh' (no R*N buffer more than the two passes hold)."""
    R, N = dhw_RN.shape
    assert dhw_RN.is_contiguous()
    hw = dhw_RN if want_dgu else torch.empty_like(dhw_RN)
    dgu = torch.empty_like(gu_R2N) if want_dgu else hw
    dw = w_R.new_empty(R)
    block_n = min(256, max(16, 1 << (N - 1).bit_length()))
    _kernels().swiglu_weighted_backward_kernel[(max(1, -(-R // 4)),)](
        gu_R2N, dhw_RN, w_R.contiguous(), hw, dw, dgu, R, N, BLOCK_R=4, BLOCK_N=block_n,
        WRITE_DGU=want_dgu)
    return (hw, dw, dgu) if want_dgu else (hw, dw)


def swiglu_backward(gu_R2N: Tensor, dh_RN: Tensor, want_h: bool = True):
    """(h_RN recomputed, d[g | u]_R2N) from [g | u] and dh; only d[g | u] if not want_h."""
    R, N = dh_RN.shape
    h = dh_RN.new_empty(R, N) if want_h else dh_RN
    dgu = torch.empty_like(gu_R2N)
    _kernels().swiglu_backward_kernel[(max(1, -(-R * N // BLOCK)),)](
        gu_R2N, dh_RN.contiguous(), h, dgu, N, R * N, WRITE_H=want_h, BLOCK=BLOCK)
    return (h, dgu) if want_h else dgu
