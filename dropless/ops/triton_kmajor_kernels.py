"""The decode experts' two GEMVs on k-major expert weights (gemv.py's `decode_experts_kmajor`):
every output's weights one contiguous run of the reduction axis, so that a program reads whole
rows, not short runs of many. Imported only by gemv.py's launchers (it imports triton).

Legend: T tokens, D model dim, F expert hidden, K top-k, R = T*K routed slots (slot t*K + k).
Weights, per expert e (ids[r]), row-major:  gate|up [2F, D] (gate = the first F rows);  down [D, F].
EVEN: the tile divides the shape (no masks: every real model's shape at the default tiles).
"""

from __future__ import annotations

import triton
import triton.language as tl

from dropless.ops.triton_pdl import pdl_start


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr):
    """fp32 values at ptrs (0 where masked); EVEN: every one in bounds, no mask."""
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _store(ptrs, v, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty))
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def kmajor_gate_up_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, F, D, K: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                          PDL: tl.constexpr = False):
    """h[r, n] = silu(W[n] . x[r // K]) * (W[F + n] . x[r // K]), W the gate|up of expert ids[r]:
    one program per (slot, BLOCK_N hidden columns); fp32 sums, h rounded once to h's dtype."""
    pdl_start(PDL)
    r = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = w_ptr + tl.load(ids_ptr + r).to(tl.int64) * 2 * F * D
    x_row = x_ptr + (r // K) * D
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = (ns < F)[:, None] & (ks < D)[None, :]
        x = _load(x_row + ks, ks < D, EVEN)[None, :]
        g += x * _load(w + ns[:, None] * D + ks[None, :], ok, EVEN)
        u += x * _load(w + (ns + F)[:, None] * D + ks[None, :], ok, EVEN)
    gs = tl.sum(g, axis=1)
    _store(h_ptr + r * F + ns, gs * tl.sigmoid(gs) * tl.sum(u, axis=1), ns < F, EVEN)


@triton.jit
def kmajor_down_kernel(h_ptr, w_ptr, ids_ptr, s_ptr, res_ptr, y_ptr, F, D, K: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                       HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    """y[t, n] = (res[t, n] +) sum_k s[t K + k] * (W_{ids[t K + k]}[n] . h[t K + k]): one program
    per (token, BLOCK_N output columns) sums its K slots in fp32 and rounds once (no partials)."""
    pdl_start(PDL)
    t = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(K):
        r = t * K + k
        w = w_ptr + tl.load(ids_ptr + r).to(tl.int64) * D * F
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            hv = _load(h_ptr + r * F + ks, ks < F, EVEN)[None, :]
            acc += hv * _load(w + ns[:, None] * F + ks[None, :],
                              (ns < D)[:, None] & (ks < F)[None, :], EVEN)
        y += tl.load(s_ptr + r).to(tl.float32) * tl.sum(acc, axis=1)
    if HAS_RES:
        y += _load(res_ptr + t * D + ns, ns < D, EVEN)
    _store(y_ptr + t * D + ns, y, ns < D, EVEN)
