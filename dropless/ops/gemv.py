"""The GEMV of decoding (triton_gemv_kernels.py): a few rows, each through its own expert's matrix
read in place by id, with plain (bf16/fp16/fp32) or int4 (AWQ) weights; and the decode MoE experts
built on it. Inference only (no autograd); CUDA, or the CPU under the Triton interpreter.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R = T*K routed rows (slot t*K + k).
Weights come as a plain [E, in, out] tensor or an int4 (qweight, qzeros, scales) triple
(dropless/quant/pack.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dropless.ops.device import counters, decode_fusion, num_sms, pdl_launch, pow2
from dropless.quant.pack import PACK

# (BLOCK_N, BLOCK_K, UNROLL: reduction steps per iteration, WAVES: grids are split until they hold
# this many programs per multiprocessor), by weight kind. int4: the fastest of 8 tiles at the
# Qwen3-30B-A3B expert shape, batch 1, on an H100 (round 19, benchmarks/gemv_tiles.py: 23.7 us
# against 27.7 for round 12's (64, 32, 4, 6)); 158 registers at sm_90, no spills. With SwiGLU the
# int4 tile is at most INT4_SWIGLU_BLOCK_N wide (143 registers; 128 wide takes 252). Plain bf16:
# the fastest of a sweep of 24 on the H200 at the medium and Qwen3-30B-A3B expert shapes
# (BENCHMARKS.md, round 12).
TILES = {"plain": (32, 32, 4, 4), "int4": (128, 32, 4, 4)}
INT4_SWIGLU_BLOCK_N = 64
# Software-pipelining stages of the decode GEMV loops (1: none), by kernel: these GEMVs and the
# projections' (triton_linear.py). DROPLESS_GEMV_STAGES="plain=3,int4=2,linear=3" overrides
# them (benchmarks/gemv_tiles.py --stages sweeps them).
STAGES = {"plain": 1, "int4": 1, "linear": 1}
STAGES_ENV = "DROPLESS_GEMV_STAGES"
WARPS = {"plain": 4, "int4": 4}   # warps per program (benchmarks/gemv_tiles.py --warps)
# The slot sum's tile: SUM_TILE fp32 values (32 registers a thread at 4 warps) of up to
# SUM_MAX_ROWS partial rows by SUM_MAX_BLOCK columns
SUM_TILE, SUM_MAX_ROWS, SUM_MAX_BLOCK = 4096, 32, 256
NORM_BLOCK = 4096   # the most x values the int4 norm prologue's statistics load at once
# The k-major decode experts (decode_experts_kmajor): (BLOCK_N, BLOCK_K, warps) of the gate|up and
# of the down kernel. The fastest of a sweep of 36 at batch 1 on an H100 at the Qwen3-30B-A3B and
# Mixtral expert shapes (round 22, benchmarks/gemv_layout.py: 32.2 us against the training
# layout's 40.8 at Qwen3, 229 against 287 at Mixtral); wider BLOCK_N was slower at both.
KMAJOR_TILES = {"gate_up": (1, 1024, 4), "down": (1, 256, 2)}


def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_gemv_kernels
    return triton_gemv_kernels


def _num_sms(device: torch.device) -> int:
    return num_sms(device.index) if torch.device(device).type == "cuda" else 1


def stages(kind: str) -> int:
    """STAGES[kind], or its DROPLESS_GEMV_STAGES override."""
    chosen = dict(STAGES)
    for item in filter(None, os.environ.get(STAGES_ENV, "").split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in STAGES or not value.strip().isdigit() or \
                not 1 <= int(value) <= 8:
            raise ValueError(f"{STAGES_ENV}: {item!r} is invalid: allowed: KERNEL=N, KERNEL one "
                             f"of {', '.join(STAGES)}, N in 1..8, separated by commas")
        chosen[name.strip()] = int(value)
    return chosen[kind]


def _gemv_step(kd: int, kind: str) -> int:
    """Reduction rows per GEMV iteration: BLOCK_K x UNROLL, the largest that divides kd (kd not
    a multiple of BLOCK_K: the full unroll, the last steps masked)."""
    _, block_k, unroll, _ = TILES[kind]
    if kd % block_k:
        return block_k * unroll
    while unroll > 1 and kd % (block_k * unroll):
        unroll //= 2
    return block_k * unroll


def _block_n(kind: str, swiglu: bool) -> int:
    """Output columns per program: the kind's tile, int4 with SwiGLU at most INT4_SWIGLU_BLOCK_N."""
    block_n = TILES[kind][0]
    return min(block_n, INT4_SWIGLU_BLOCK_N) if kind == "int4" and swiglu else block_n


def gemv_split(rows: int, n: int, kd: int, device, kind: str = "plain",
               swiglu: bool = False) -> int:
    """Split the reduction until the grid fills the GPU WAVES times over: at batch 1 the rows
    alone leave most multiprocessors idle, and a GEMV needs many loads in flight. The partials are
    fp32, summed afterwards (deterministic, no atomics). `swiglu`: the grid of the one-pass
    gate|up GEMV (n = the hidden size)."""
    _, block_k, _, waves = TILES[kind]
    block_n = _block_n(kind, swiglu)
    if kd % block_k:
        return 1
    units = kd // _gemv_step(kd, kind)
    split = min(units, max(1, -(-waves * _num_sms(device) // (rows * -(-n // block_n)))))
    while units % split:
        split -= 1
    return split


def _kind(w) -> str:
    return "int4" if isinstance(w, tuple) else "plain"


def _sum_block_j(rows: int, block: int) -> int:
    """Partial rows per tile of a slot sum over `block` columns (SUM_TILE values a tile)."""
    return max(1, min(pow2(rows), SUM_MAX_ROWS, SUM_TILE // block))


def gemv(x, w, out, *, n, rows_per_token=1, expert=None, scale=None, swiglu=False, split_k=1,
         gu_split=0, unpack="nibble", total=None, residual=None, slots=1, norm=None) -> None:
    """out[(split,) r] = epilogue(x[r // rows_per_token] @ W[expert(r)]) for every row r of out;
    w plain [(E,) KD, WN] or an int4 triple; with gu_split, x is [gu_split, *, 2 KD] fp32 gate|up
    partials and SwiGLU is applied on read. `unpack`: how int4 kernels read the packed int32s:
    "nibble" (gemv_nibble_kernel; with SwiGLU: as "interleave"), "interleave" or "gather"
    (gemv_kernel). With `total` [R / slots, n]: also total = (residual +) the sum of the fp32
    partials out [split_k, R, n] over splits and each `slots` consecutive rows, rounded once,
    by the last program to arrive at each (token, column tile). `norm` (weight [KD], eps), int4
    "nibble" only: x is first F.rms_norm(x, weight, eps), in the GEMV's launch."""
    kind = _kind(w)
    quant = kind == "int4"
    qw, qz, sc = w if quant else (w, w, w)
    block_n, block_k = _block_n(kind, swiglu), TILES[kind][1]
    rows = out.shape[-2]
    kd = x.shape[-1] // 2 if gu_split else x.shape[-1]
    wn = qw.shape[-1] * PACK if quant else qw.shape[-1]
    gs = kd // qz.shape[-2] if quant else block_k
    assert qw.shape[-2] == kd and (wn == 2 * n if swiglu else wn == n) and qw.stride(-1) == 1
    assert gs % block_k == 0 and kd % split_k == 0
    mask_k = kd % block_k != 0
    assert not (mask_k and (quant or split_k > 1))
    step = _gemv_step(kd // split_k, kind)
    gather_unpack = unpack == "gather"
    unroll = step // block_k if not gather_unpack else min(2, step // block_k)
    while quant and gs % (block_k * unroll):   # an iteration inside one group (the kernel's
        unroll //= 2                             # zero points and scales: once per iteration)
    assert x.stride(-1) == 1 and (not gu_split or x.dtype == torch.float32)
    strides = tuple(t.stride(0) if t.dim() == 3 else 0 for t in (qw, qz, sc))
    grid = (rows, -(-n // block_n), split_k)
    if total is not None:
        assert out.dtype == torch.float32 and out.is_contiguous() and rows % slots == 0
        assert total.shape == (rows // slots, n) and total.is_contiguous()
        assert residual is None or (residual.shape == total.shape and residual.is_contiguous())
    cnt = out if total is None else counters(x.device, rows // slots * grid[1])
    args = (x, x.stride(0) if gu_split else 0, x.stride(-2), rows_per_token,
            out, out.stride(0) if out.dim() == 3 else 0, out.stride(-2),
            qw, qz, sc, *strides,
            out if expert is None else expert, out if scale is None else scale,
            out if total is None else total, out if residual is None else residual, cnt, slots,
            n, kd, wn)
    meta = dict(GS=gs, BLOCK_K=block_k, BLOCK_N=block_n, SPLIT_K=split_k,
                HAS_EXPERT=expert is not None, SCALE=scale is not None, GU_SPLIT=gu_split,
                UNROLL=unroll, STAGES=stages(kind), num_warps=WARPS[kind],
                TOTAL=total is not None, HAS_RES=residual is not None,
                BLOCK_J=_sum_block_j(split_k * slots, block_n), **pdl_launch(x.device))
    if quant and unpack == "nibble" and not swiglu:
        if norm is not None:
            assert not gu_split and norm[0].shape == (kd,) and norm[0].is_contiguous()
            meta.update(norm_ptr=norm[0], eps=norm[1], NORM=True,
                        NORM_BLOCK=min(pow2(kd), NORM_BLOCK))
        _kernels().gemv_nibble_kernel[grid](*args, **meta)
    else:
        assert norm is None, "the norm prologue is the int4 nibble kernel's"
        _kernels().gemv_kernel[grid](*args, QUANT=quant, SWIGLU=swiglu,
                                     GATHER_UNPACK=gather_unpack, MASK_K=mask_k, **meta)


def decode_experts(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, gate_up, down,
                   unpack: str = "nibble", residual_TD: Tensor | None = None) -> Tensor:
    """y[t] = (residual[t] +) sum_k weights[t, k] * SwiGLU_{ids[t, k]}(x[t]). Rows are the slots
    themselves (no sort): h = SwiGLU per slot, then down with the routing weight, then one kernel
    sums the K slots and the split partials in fp32 (with the residual) and rounds once."""
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    K = expert_ids_TK.shape[1]
    F_ = (down[0] if isinstance(down, tuple) else down).shape[1]
    R = T * K
    if R == 0:
        return _no_slots(x_TD, residual_TD)
    expert_S = expert_ids_TK.reshape(-1)
    w_S = weights_TK.reshape(-1)
    kw = dict(expert=expert_S, unpack=unpack)
    kind, gu_split = _kind(down), 0
    if gemv_split(R, F_, D, x_TD.device, kind, swiglu=True) == 1:   # SwiGLU in one pass
        h = x_TD.new_empty(R, F_)
        gemv(x_TD, gate_up, h, n=F_, rows_per_token=K, swiglu=True, **kw)
    else:   # batch 1: gate|up as fp32 partials (split reduction); the down GEMV sums them and
            # applies SwiGLU as it reads them
        split = gemv_split(R, 2 * F_, D, x_TD.device, kind)
        h = torch.empty(split, R, 2 * F_, device=x_TD.device, dtype=torch.float32)
        gemv(x_TD, gate_up, h, n=2 * F_, rows_per_token=K, split_k=split, **kw)
        gu_split = split
    split = gemv_split(R, D, F_, x_TD.device, kind)
    y_PSD = torch.empty(split, R, D, device=x_TD.device, dtype=torch.float32)
    return gemv_sum(h, down, y_PSD, n=D, slots=K, residual_TD=residual_TD, dtype=x_TD.dtype,
                    scale=w_S, split_k=split, gu_split=gu_split, **kw)


def gemv_sum(x, w, y_PRD: Tensor, *, n: int, slots: int = 1, residual_TD: Tensor | None = None,
             dtype: torch.dtype | None = None, **kw) -> Tensor:
    """gemv(x, w, y_PRD, **kw) into fp32 partials [P, T * slots, n], then their sum over the P
    splits and each token's slots, with the residual, rounded once to `dtype` (default: the
    residual's): [T, n]. The sum is the GEMV's own last step where device.decode_fusion("sum")
    says so, else one sum_partials launch."""
    if not decode_fusion("sum"):
        gemv(x, w, y_PRD, n=n, **kw)
        return sum_partials(y_PRD, slots, residual_TD, dtype)
    total = y_PRD.new_empty(y_PRD.shape[1] // slots, n, dtype=dtype or residual_TD.dtype)
    res = None if residual_TD is None else residual_TD.contiguous()
    gemv(x, w, y_PRD, n=n, slots=slots, total=total, residual=res, **kw)
    return total


def sum_partials(y_PRD: Tensor, slots: int = 1, residual_TD: Tensor | None = None,
                 dtype: torch.dtype | None = None) -> Tensor:
    """y[t] = (residual[t] +) sum over the P split partials and a token's `slots` rows of the fp32
    partials y_PRD [P, T * slots, D], in one kernel, rounded once to `dtype` (default: the
    residual's)."""
    P, R, D = y_PRD.shape
    T = R // slots
    y_TD = y_PRD.new_empty(T, D, dtype=dtype or residual_TD.dtype)
    res = None if residual_TD is None else residual_TD.contiguous()
    block = min(SUM_MAX_BLOCK, SUM_TILE // min(pow2(P * slots), SUM_MAX_ROWS))
    block_j = _sum_block_j(P * slots, block)
    from dropless.ops.triton_sum_kernels import sum_slots_kernel
    sum_slots_kernel[(T, -(-D // block))](
        y_PRD, y_TD if res is None else res, y_TD, T, D, slots, P,
        HAS_RES=res is not None, BLOCK_J=block_j, BLOCK=block, num_warps=4,
        **pdl_launch(y_PRD.device))
    return y_TD


def kmajor(w: Tensor) -> bool:
    """Whether plain expert weights [E, in, out] are laid out k-major: each output column's `in`
    weights one contiguous run (the memory of a contiguous [E, out, in])."""
    return w.transpose(1, 2).is_contiguous()


def decode_experts_kmajor(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor,
                          gate_up_EDF2: Tensor, down_EFD: Tensor,
                          residual_TD: Tensor | None = None, tiles: dict = KMAJOR_TILES) -> Tensor:
    """decode_experts on k-major weights (`kmajor`), in two kernels (triton_kmajor_kernels.py):
    h = SwiGLU per slot (fp32 sums, h rounded once to x's dtype), then per token the down GEMV
    of its K slots with their routing weights and the residual, in fp32, rounded once. A program
    reads whole rows of its expert's weights, where the training layout's reads runs of BLOCK_N
    columns of many rows; and nothing is split, so nothing is summed after."""
    from dropless.ops.triton_kmajor_kernels import kmajor_down_kernel, kmajor_gate_up_kernel
    assert kmajor(gate_up_EDF2) and kmajor(down_EFD)
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    K, F_ = expert_ids_TK.shape[1], down_EFD.shape[1]
    if T * K == 0:
        return _no_slots(x_TD, residual_TD)
    ids_S, w_S = expert_ids_TK.reshape(-1).contiguous(), weights_TK.reshape(-1).contiguous()
    launch = pdl_launch(x_TD.device)
    bn, bk, warps = tiles["gate_up"]
    bk = min(bk, pow2(D))
    h_SF = x_TD.new_empty(T * K, F_)
    kmajor_gate_up_kernel[(T * K, -(-F_ // bn))](
        x_TD, gate_up_EDF2, ids_S, h_SF, F_, D, K, bn, bk, EVEN=D % bk == 0 and F_ % bn == 0,
        num_warps=warps, **launch)
    bn, bk, warps = tiles["down"]
    bk = min(bk, pow2(F_))
    y_TD = torch.empty_like(x_TD)
    res = y_TD if residual_TD is None else residual_TD.contiguous()
    kmajor_down_kernel[(T, -(-D // bn))](
        h_SF, down_EFD, ids_S, w_S, res, y_TD, F_, D, K, bn, bk, EVEN=F_ % bk == 0 and D % bn == 0,
        HAS_RES=residual_TD is not None, num_warps=warps, **launch)
    return y_TD


def _no_slots(x_TD: Tensor, residual_TD: Tensor | None) -> Tensor:
    """The experts' output where no slot is routed: 0, plus the residual."""
    return torch.zeros_like(x_TD) if residual_TD is None else residual_TD.to(x_TD.dtype, copy=True)


@torch.library.custom_op("dropless::experts_decode", mutates_args=())
def experts_decode(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, gate_up_EDF2: Tensor,
                   down_EFD: Tensor, residual_TD: Tensor | None = None) -> Tensor:
    """decode_experts with plain weights, contiguous or both k-major (kmajor_experts in
    serve/moe_decode.py lays them out so for inference). A custom op: opaque to torch.compile
    (which would otherwise trace into the launches) and captured whole by CUDA graphs."""
    if kmajor(gate_up_EDF2) and kmajor(down_EFD):
        return decode_experts_kmajor(x_TD, expert_ids_TK, weights_TK, gate_up_EDF2, down_EFD,
                                     residual_TD)
    assert gate_up_EDF2.is_contiguous() and down_EFD.is_contiguous()
    return decode_experts(x_TD, expert_ids_TK, weights_TK, gate_up_EDF2, down_EFD,
                          residual_TD=residual_TD)


@experts_decode.register_fake
def _(x_TD, expert_ids_TK, weights_TK, gate_up_EDF2, down_EFD, residual_TD=None):
    return x_TD.new_empty(x_TD.shape)
