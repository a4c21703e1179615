"""Launchers of the expert GEMV kernels (triton_gemv_kernels.py): the decode MoE path for a few
routed rows, reading each chosen expert's weights in place. Inference only (no autograd).

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows.

On a GPU the block sizes are autotuned per shape at first use (that first call times a few
configurations and syncs: the engine makes it in its warm-up, before capturing a CUDA graph); the
Triton interpreter (CPU tests) runs one fixed configuration.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

FIXED = {"BLOCK_N": 32, "BLOCK_K": 64}


@functools.cache
def _kernels():
    import triton

    from dropless.ops import triton_gemv_kernels as k

    if os.environ.get("TRITON_INTERPRET") == "1":
        return k.gate_up_gemv_kernel, k.down_gemv_kernel, FIXED
    # GEMVs are bandwidth-bound: enough programs and loads in flight to cover the whole GPU
    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": kk}, num_warps=w, num_stages=s)
               for n, kk, w, s in [(16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 4),
                                   (64, 64, 4, 3), (64, 128, 8, 3), (128, 32, 4, 4)]]
    gate_up = triton.autotune(configs, key=["D", "F", "TOP_K"])(k.gate_up_gemv_kernel)
    down = triton.autotune(configs, key=["F", "D"])(k.down_gemv_kernel)
    return gate_up, down, {}


@torch.library.custom_op("dropless::experts_gemv_rows", mutates_args=())
def experts_gemv_rows(x_TD: Tensor, expert_ids_TK: Tensor, gate_up_EDF2: Tensor,
                      down_EFD: Tensor) -> Tensor:
    """y_RD: row t*K + k = swiglu_{ids[t, k]}(x[t]), uncombined. A custom op: opaque to
    torch.compile (which would otherwise trace into the launches and the autotuner)."""
    T, K = expert_ids_TK.shape
    D, F = x_TD.shape[1], down_EFD.shape[1]
    assert gate_up_EDF2.is_contiguous() and down_EFD.is_contiguous()
    x_TD, ids_R = x_TD.contiguous(), expert_ids_TK.reshape(-1).contiguous()
    R = T * K
    h_RF = x_TD.new_empty(R, F)
    y_RD = x_TD.new_empty(R, D)
    if R > 0:
        gate_up, down, blocks = _kernels()
        gate_up[lambda meta: (R, -(-F // meta["BLOCK_N"]))](x_TD, ids_R, gate_up_EDF2, h_RF,
                                                            D, F, K, **blocks)
        down[lambda meta: (R, -(-D // meta["BLOCK_N"]))](h_RF, ids_R, down_EFD, y_RD, F, D,
                                                        **blocks)
    return y_RD


@experts_gemv_rows.register_fake
def _(x_TD, expert_ids_TK, gate_up_EDF2, down_EFD):
    return x_TD.new_empty(expert_ids_TK.numel(), x_TD.shape[1])


def experts_gemv(x_TD: Tensor, weights_TK: Tensor, expert_ids_TK: Tensor, gate_up_EDF2: Tensor,
                 down_EFD: Tensor) -> Tensor:
    """y_TD = sum_k weights[t, k] * swiglu_{ids[t, k]}(x[t]); the combine is a [T, 1, K] bmm in
    the activation dtype, as the training path's."""
    T, K = expert_ids_TK.shape
    y_RD = experts_gemv_rows(x_TD, expert_ids_TK, gate_up_EDF2, down_EFD)
    w_T1K = weights_TK.to(y_RD.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, y_RD.view(T, K, -1)).squeeze(1)
