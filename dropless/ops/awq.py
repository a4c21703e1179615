"""Int4 (AWQ GEMM layout) linear and MoE experts: the dequantize-then-matmul reference (the CPU path
and the test oracle), the launchers of the Triton kernels, custom ops with fake implementations (so
CUDA graphs and torch.compile can capture them) and the functional API the modules call.

Legend: T tokens, D model dim, F expert hidden, E experts, K top-k, R routed rows, S slots (t*K + k).
Packed operands come as (qweight, qzeros, scales) triples, see dropless/quant/pack.py; a linear's
are [in, ...] matrices, the experts' [E, in, ...] stacks. Inference only (no autograd).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from dropless.ops import reference
from dropless.ops.device import has_triton
from dropless.ops.gemv import decode_experts, gemv, gemv_split, gemv_sum
from dropless.ops.reference import Plan
from dropless.ops.triton_grouped import tile_map
from dropless.quant.pack import PACK, dequantize

# the grouped kernel's tile by rows per expert (_tile), from a sweep at 64 tokens (H100, round 21,
# benchmarks/awq.py --tiles): 16-row tiles read 128 rows of K a step (Qwen3-30B-A3B shape: 0.454 ->
# 0.421 ms), a few rows per expert take 64-row tiles at 4 warps, not 32 at 8 (Mixtral: 1.397 ->
# 1.016 ms); past 32 rows per expert (prefill) the tile is round 18's, untimed; the GEMV's are in
# gemv.py
GROUPED_BLOCK_N = 64
GEMV_MAX_TOKENS = 16   # a linear takes the GEMV kernel up to this many rows
# how the kernels read packed int32s: the GEMV "nibble" by nibble in packed order
# (gemv_nibble_kernel), or spread over columns: "interleave" in registers or "gather" loads (see
# _group_params; the grouped kernel and SwiGLU GEMVs under "nibble" interleave); benchmarks/awq.py
# times them
# DROPLESS_AWQ_GROUPED_PACKED (with "nibble"): whether the grouped kernel dequantizes its tiles in
# packed order, joins them into columns and scales the dot's result (round 25): "0" never, "1"
# always, "small" (the default) in 16-row tiles only (a few rows per expert). At 64 tokens on an
# H100, side by side in one process (round 28), the Qwen3-30B-A3B shape's experts (16-row tiles):
# 0.391 ms packed or small, 0.418 unpacked; Mixtral's (64-row tiles): 1.144 packed, 1.025 small
# or unpacked (round 21's tiles, tuned for the unpacked kernel)
GROUPED_PACKED_ENV = "DROPLESS_AWQ_GROUPED_PACKED"
GROUPED_PACKED = ("0", "1", "small")
GROUPED_PACKED_DEFAULT = "small"
UNPACK_ENV = "DROPLESS_AWQ_UNPACK"
UNPACKS = ("nibble", "interleave", "gather")
# the grouped kernel's tile, "BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES", for every launch (a sweep's
# knob: benchmarks/awq.py --tiles); unset, the tile follows the rows per expert (_tile)
TILE_ENV = "DROPLESS_AWQ_TILE"


def _grouped_packed(block_m: int) -> bool:
    mode = os.environ.get(GROUPED_PACKED_ENV) or GROUPED_PACKED_DEFAULT
    if mode not in GROUPED_PACKED:
        raise ValueError(f"{GROUPED_PACKED_ENV}={mode!r} is invalid: allowed: "
                         f"{', '.join(GROUPED_PACKED)}")
    return _unpack() == "nibble" and (mode == "1" or mode == "small" and block_m <= 16)


def _unpack() -> str:
    unpack = os.environ.get(UNPACK_ENV) or UNPACKS[0]
    if unpack not in UNPACKS:
        raise ValueError(f"{UNPACK_ENV}={unpack!r} is invalid: allowed: {', '.join(UNPACKS)}")
    return unpack


def kernels_run(x: Tensor) -> bool:
    """Whether the Triton kernels run here: CUDA (or the CPU under TRITON_INTERPRET=1), float
    activations."""
    if not has_triton():
        return False
    on_device = x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


# ---- reference -------------------------------------------------------------------------------------

def reference_linear(x_MI: Tensor, qweight, qzeros, scales) -> Tensor:
    return x_MI @ dequantize(qweight, qzeros, scales, x_MI.dtype)


def _expert(x, e, gqw, gqz, gsc, dqw, dqz, dsc) -> Tensor:
    """SwiGLU of expert e, its weights dequantized one expert at a time (bounded memory)."""
    g, u = (x @ dequantize(gqw[e], gqz[e], gsc[e], x.dtype)).chunk(2, dim=-1)
    return (F.silu(g) * u) @ dequantize(dqw[e], dqz[e], dsc[e], x.dtype)


def reference_experts(x_RD, counts_E, *packed) -> Tensor:
    counts = counts_E.tolist()   # sync: split sizes
    outs = [_expert(x, e, *packed) for e, x in enumerate(x_RD.split(counts)) if x.shape[0]]
    if not outs:
        return x_RD.new_empty(0, x_RD.shape[-1])
    return torch.cat(outs)


def reference_decode(x_TD, expert_ids_TK, weights_TK, *packed) -> Tensor:
    """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]), a loop over the experts present."""
    acc = torch.promote_types(x_TD.dtype, torch.float32)
    y_TD = torch.zeros_like(x_TD, dtype=acc)
    for e in expert_ids_TK.unique().tolist():   # sync: which experts to run
        token_idx, k_idx = torch.nonzero(expert_ids_TK == e, as_tuple=True)
        out = _expert(x_TD[token_idx], e, *packed).to(acc)
        y_TD = y_TD.index_add(0, token_idx, out * weights_TK[token_idx, k_idx, None].to(acc))
    return y_TD.to(x_TD.dtype)


# ---- launchers -------------------------------------------------------------------------------------

def _kernels():   # not cached: torch.compile traces it (an import is a dict lookup)
    from dropless.ops import triton_awq_kernels
    return triton_awq_kernels


def _expert_strides(qw, qz, sc):
    return (qw.stride(0), qz.stride(0), sc.stride(0)) if qw.dim() == 3 else (0, 0, 0)


def _gemv(x, qw, qz, sc, out, **kw) -> None:
    gemv(x, (qw, qz, sc), out, unpack=_unpack(), **kw)


def _tile_override() -> tuple[int, ...] | None:
    spec = os.environ.get(TILE_ENV)
    if not spec:
        return None
    try:
        tile = tuple(int(v) for v in spec.split(","))
    except ValueError:
        tile = ()
    if len(tile) != 5 or any(v < 1 for v in tile) or any(v & (v - 1) for v in tile[:4]):
        raise ValueError(f"{TILE_ENV}={spec!r} is invalid: allowed: five positive integers "
                         "BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES, the first four powers of two")
    return tile


def _grouped(a, qw, qz, sc, c, *, n, num_rows, tile, tiles=None, a_row=None, out_row=None,
             scale=None, swiglu=False) -> None:
    """c[out_row(r)] = epilogue(a[a_row(r)] @ W[e(r)]) over expert-contiguous rows (tiles), or
    over all rows with one matrix (tiles None)."""
    kd = a.shape[1]
    gs = kd // qz.shape[-2]
    wn = qw.shape[-1] * PACK
    block_m, block_n, block_k, warps, stages = tile
    block_k = min(block_k, gs)
    assert qw.shape[-2] == kd and (wn == 2 * n if swiglu else wn == n) and gs % block_k == 0
    if tiles is None:
        num_m, meta = -(-num_rows // block_m), (c, c, c)
    else:
        num_m, meta = tiles[0].numel(), tiles
    grid = (num_m, -(-n // block_n))
    _kernels().awq_grouped_kernel[grid](
        a, a.stride(0), c, c.stride(0),
        qw, qz, sc, *_expert_strides(qw, qz, sc),
        *meta,
        c if a_row is None else a_row, c if out_row is None else out_row,
        c if scale is None else scale,
        num_rows, n, kd, wn,
        GS=gs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DENSE=tiles is None,
        GATHER=a_row is not None, SCATTER=out_row is not None, SCALE=scale is not None,
        SWIGLU=swiglu, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        GATHER_UNPACK=_unpack() == "gather", PACKED=_grouped_packed(block_m),
        num_warps=warps, num_stages=stages)


def _tile(rows: int, experts: int) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, WARPS, STAGES) of the grouped kernel, by the mean rows per
    expert: an expert's rows should fill one row tile, so that its weights are read (and
    dequantized) once. Few rows: 16 (the smallest MMA); more: 64, which at 16 rows per expert
    beat 32 (padding costs MMAs, but the kernel is bound by the dequantization)."""
    tile = _tile_override()
    if tile is not None:
        return tile
    mean = rows / experts
    if mean <= 8:
        return 16, GROUPED_BLOCK_N, 128, 4, 3
    return 64, GROUPED_BLOCK_N, 64, 4 if mean <= 32 else 8, 3


# ---- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("dropless::awq_linear", mutates_args=())
def _linear_op(x_MI: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor,
               residual_MN: Tensor | None = None, norm_weight: Tensor | None = None,
               eps: float = 0.0) -> Tensor:
    """(residual +) norm(x) @ dequant(W), in x's dtype; norm(x) = F.rms_norm(x, norm_weight,
    eps) where norm_weight is given, else x. GEMV rows: the norm in the GEMV's launch (the
    nibble kernel's), the split partials (fp32) and the residual summed in one kernel, rounded
    once."""
    x_MI = x_MI.contiguous()
    M, N = x_MI.shape[0], scales.shape[-1]
    assert residual_MN is None or residual_MN.shape == (M, N)
    out = x_MI.new_empty(M, N)
    if M == 0:
        return out
    norm = None if norm_weight is None else (norm_weight.contiguous(), eps)
    if norm is not None and (M > GEMV_MAX_TOKENS or _unpack() != "nibble"):
        x_MI, norm = F.rms_norm(x_MI, (x_MI.shape[1],), norm_weight, eps), None
    if M <= GEMV_MAX_TOKENS:
        split = gemv_split(M, N, x_MI.shape[1], x_MI.device, "int4")
        if split == 1 and residual_MN is None:
            _gemv(x_MI, qweight, qzeros, scales, out, n=N, norm=norm)
            return out
        out_PMN = torch.empty(split, M, N, device=x_MI.device, dtype=torch.float32)
        return gemv_sum(x_MI, (qweight, qzeros, scales), out_PMN, n=N, residual_TD=residual_MN,
                        dtype=x_MI.dtype, split_k=split, unpack=_unpack(), norm=norm)
    _grouped(x_MI, qweight, qzeros, scales, out, n=N, num_rows=M, tile=_tile(M, 1))
    return out if residual_MN is None else out.add_(residual_MN)


@_linear_op.register_fake
def _(x_MI, qweight, qzeros, scales, residual_MN=None, norm_weight=None, eps=0.0):
    return x_MI.new_empty(x_MI.shape[0], scales.shape[-1])


@torch.library.custom_op("dropless::awq_moe_decode", mutates_args=())
def _decode_op(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, gqw: Tensor, gqz: Tensor,
               gsc: Tensor, dqw: Tensor, dqz: Tensor, dsc: Tensor,
               residual_TD: Tensor | None = None) -> Tensor:
    """decode_experts (gemv.py) on packed weights (plus the residual, in its last kernel)."""
    return decode_experts(x_TD, expert_ids_TK, weights_TK, (gqw, gqz, gsc), (dqw, dqz, dsc),
                          _unpack(), residual_TD)


@_decode_op.register_fake
def _(x_TD, expert_ids_TK, weights_TK, gqw, gqz, gsc, dqw, dqz, dsc, residual_TD=None):
    return x_TD.new_empty(x_TD.shape)


@torch.library.custom_op("dropless::awq_experts", mutates_args=())
def _experts_op(x_RD: Tensor, counts_E: Tensor, gqw: Tensor, gqz: Tensor, gsc: Tensor,
                dqw: Tensor, dqz: Tensor, dsc: Tensor) -> Tensor:
    """Expert-contiguous rows in, rows out (already dispatched: expert parallelism, capacity)."""
    x_RD = x_RD.contiguous()
    R, D = x_RD.shape
    F_, E = dqw.shape[1], counts_E.numel()
    y_RD = x_RD.new_empty(R, D)
    if R == 0:
        return y_RD
    tile = _tile(R, E)
    tiles = tile_map(counts_E, R, tile[0])
    h_RF = x_RD.new_empty(R, F_)
    _grouped(x_RD, gqw, gqz, gsc, h_RF, n=F_, num_rows=R, tiles=tiles, tile=tile,
             swiglu=True)
    _grouped(h_RF, dqw, dqz, dsc, y_RD, n=D, num_rows=R, tiles=tiles, tile=tile)
    return y_RD


@_experts_op.register_fake
def _(x_RD, counts_E, gqw, gqz, gsc, dqw, dqz, dsc):
    return x_RD.new_empty(x_RD.shape)


@torch.library.custom_op("dropless::awq_fused_experts", mutates_args=())
def _fused_op(x_TD: Tensor, weights_TK: Tensor, slot_of_row_R: Tensor, counts_E: Tensor,
              gqw: Tensor, gqz: Tensor, gsc: Tensor, dqw: Tensor, dqz: Tensor,
              dsc: Tensor) -> Tensor:
    """Token rows gathered in the gate|up kernel; the down kernel scales by the routing weight and
    scatters to slot order; then the deterministic K-sum."""
    x_TD = x_TD.contiguous()
    T, D = x_TD.shape
    R, K, F_, E = slot_of_row_R.numel(), weights_TK.shape[1], dqw.shape[1], counts_E.numel()
    if R == 0:
        return torch.zeros_like(x_TD)
    tile = _tile(R, E)
    tiles = tile_map(counts_E, R, tile[0])
    token_R = slot_of_row_R // K
    w_R = weights_TK.reshape(-1)[slot_of_row_R].to(torch.float32).contiguous()
    h_RF = x_TD.new_empty(R, F_)
    _grouped(x_TD, gqw, gqz, gsc, h_RF, n=F_, num_rows=R, tiles=tiles, tile=tile,
             a_row=token_R, swiglu=True)
    y_SD = torch.empty(R, D, device=x_TD.device, dtype=torch.float32)
    _grouped(h_RF, dqw, dqz, dsc, y_SD, n=D, num_rows=R, tiles=tiles, tile=tile,
             out_row=slot_of_row_R, scale=w_R)
    return y_SD.view(T, K, D).sum(1).to(x_TD.dtype)


@_fused_op.register_fake
def _(x_TD, weights_TK, slot_of_row_R, counts_E, gqw, gqz, gsc, dqw, dqz, dsc):
    return x_TD.new_empty(x_TD.shape)


# ---- functional API --------------------------------------------------------------------------------

def _autocast(x: Tensor) -> Tensor:
    """Custom ops are invisible to autocast: take its compute dtype here, as F.linear would."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def awq_linear(x_MI: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor,
               residual_MN: Tensor | None = None, norm: tuple[Tensor, float] | None = None
               ) -> Tensor:
    """(residual_MN +) norm(x_MI) @ dequant(W): the kernels where they run, the reference
    elsewhere. `norm` (weight in x's dtype, eps): F.rms_norm first, in the GEMV's launch where
    it can be."""
    cast = _autocast(x_MI)
    if norm is not None and (cast is not x_MI or not kernels_run(x_MI)):
        # the norm's statistics from x as it is (F.rms_norm's), then autocast's cast
        x_MI, norm = _autocast(F.rms_norm(x_MI, (x_MI.shape[-1],), *norm)), None
    else:
        x_MI = cast
    if kernels_run(x_MI):
        return _linear_op(x_MI, qweight, qzeros, scales, residual_MN,
                          *((None, 0.0) if norm is None else norm))
    y_MN = reference_linear(x_MI, qweight, qzeros, scales)
    return y_MN if residual_MN is None else (residual_MN + y_MN).to(y_MN.dtype)


def awq_experts(x_RD: Tensor, counts_E: Tensor, *packed: Tensor) -> Tensor:
    x_RD = _autocast(x_RD)
    if kernels_run(x_RD):
        return _experts_op(x_RD, counts_E, *packed)
    return reference_experts(x_RD, counts_E, *packed)


def awq_moe_decode(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, *packed: Tensor,
                   residual_TD: Tensor | None = None) -> Tensor:
    x_TD = _autocast(x_TD)
    if kernels_run(x_TD):
        return _decode_op(x_TD, expert_ids_TK, weights_TK, *packed, residual_TD)
    y_TD = reference_decode(x_TD, expert_ids_TK, weights_TK, *packed)
    return y_TD if residual_TD is None else (residual_TD + y_TD).to(y_TD.dtype)


def decode_pays(num_rows: int, num_experts: int) -> bool:
    """The per-slot GEMV re-reads an expert's weights for each of its rows: worth it while experts
    see about one row each (decode); past that the grouped kernel reads each expert once."""
    return num_rows <= max(16, num_experts)


def awq_fused_experts(x_TD: Tensor, plan: Plan, weights_TK: Tensor, *packed: Tensor) -> Tensor:
    """The MoE layer's fused path (dropless plans): decode kernel for a few rows, else grouped."""
    assert plan.keep_S is None, "the fused path takes dropless plans only"
    x_TD = _autocast(x_TD)
    R, E = plan.slot_of_row_R.numel(), plan.counts_E.numel()
    if not kernels_run(x_TD):
        y_RD = reference_experts(reference.dispatch(x_TD, plan), plan.counts_E, *packed)
        return reference.combine(y_RD, plan, weights_TK)
    if decode_pays(R, E):
        # expert of every slot from the plan, on the device (output_size: no sync)
        experts = torch.arange(E, device=x_TD.device)
        expert_R = torch.repeat_interleave(experts, plan.counts_E, output_size=R)
        expert_S = torch.empty_like(expert_R).index_put_((plan.slot_of_row_R,), expert_R)
        return _decode_op(x_TD, expert_S.view(weights_TK.shape), weights_TK, *packed)
    return _fused_op(x_TD, weights_TK, plan.slot_of_row_R, plan.counts_E, *packed)
