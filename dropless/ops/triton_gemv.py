"""Launchers of the expert GEMV kernels (triton_gemv_kernels.py): the decode MoE path for a few
routed rows, reading each chosen expert's weights in place. Inference only (no autograd).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK_N, BLOCK_K = 32, 64


@functools.cache
def _kernels():
    from dropless.ops import triton_gemv_kernels
    return triton_gemv_kernels


def experts_gemv(x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EDF2: Tensor,
                 down_EFD: Tensor) -> Tensor:
    """y_TD = sum_k weights[t, k] * swiglu_{ids[t, k]}(x[t]); the combine is a [T, 1, K] bmm in
    the activation dtype, as the training path's."""
    T, K = expert_ids_TK.shape
    D, F = x_TD.shape[1], down_EFD.shape[1]
    assert gate_up_EDF2.is_contiguous() and down_EFD.is_contiguous()
    x_TD, ids_R = x_TD.contiguous(), expert_ids_TK.reshape(-1).contiguous()
    R = T * K
    h_RF = x_TD.new_empty(R, F)
    y_RD = x_TD.new_empty(R, D)
    if R > 0:
        kernels = _kernels()
        kernels.gate_up_gemv_kernel[(R, triton_cdiv(F))](x_TD, ids_R, gate_up_EDF2, h_RF, D, F, K,
                                                        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        kernels.down_gemv_kernel[(R, triton_cdiv(D))](h_RF, ids_R, down_EFD, y_RD, F, D,
                                                     BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    w_T1K = weights_TK.to(y_RD.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_RD.view(T, K, D)).squeeze(1)


def triton_cdiv(n: int) -> int:
    return -(-n // BLOCK_N)
