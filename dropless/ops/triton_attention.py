"""Launcher of the decode step's attention (triton_attention_kernels.py): one query token per cache
row against the row's KV cache, grouped-query heads, split over the keys ("flash decoding").

SDPA over the grouped query rows (dropless/serve/decode.py `gqa`) runs one program per (row, kv
head) at decode's tiny query count: at batch 1 a handful of programs stream the whole cache
while the rest of the GPU idles. Splitting the keys into chunks gives b * G * splits programs,
and a second small kernel merges the chunks' partial softmaxes. The split count is a function of
(b, length) and the device alone (no host sync, fixed shapes): capturable in a CUDA graph.
Inference only (no autograd); SDPA with decode.make_step's mask stays the reference.

Legend: b rows, H heads, G kv heads, Dh head dim, S cache length.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from dropless.ops.device import counters, decode_fusion, num_sms, pdl_launch, pow2
from dropless.ops.triton_grouped import _precision

BLOCK_N = 64           # keys per tile, and the least chunk a split takes
# The combine's tile: at most COMBINE_TILE float32 values (heads x splits x head dim; 32 registers a
# thread at 4 warps; twice that spilled at sm_90) at a time. With device.decode_fusion("combine"),
# the split kernel's last program per (row, kv head) combines its group's heads when that takes at
# most FUSED_COMBINE_TILES tiles (past that, the combine's own launch spreads the work over b * H
# programs)
COMBINE_TILE = 4096
FUSED_COMBINE_TILES = 4
CPU_PROGRAMS = 16      # the interpreter's stand-in for an SM count: enough to exercise splits


@functools.cache
def _kernels():
    from dropless.ops import triton_attention_kernels
    return triton_attention_kernels



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


ONE_SPLIT_ENV = "DROPLESS_DECODE_ATTN_ONE_SPLIT"


def one_split_upto() -> int:
    """DROPLESS_DECODE_ATTN_ONE_SPLIT=N: contexts of at most N keys in one chunk (no partials, no
    combine launch; each program then reads all its keys alone). 0 (the default): never. An
    experiment for short contexts, where a split of 64 keys and the combine are two launches of
    ~2-3 us for little work (benchmarks/decode_switches.py)."""
    value = os.environ.get(ONE_SPLIT_ENV, "0")
    if not value.isdigit():
        raise ValueError(f"{ONE_SPLIT_ENV}={value!r} is invalid: allowed: an integer >= 0 (keys)")
    return int(value)


def num_splits(b: int, G: int, length: int, programs: int) -> int:
    """Key chunks per (row, kv head): enough for b * G * splits to reach `programs` (2x the SMs),
    none shorter than BLOCK_N keys; one up to one_split_upto() keys."""
    if length <= one_split_upto():
        return 1
    return max(1, min(_cdiv(programs, b * G), _cdiv(length, BLOCK_N)))


def combine_tiles(splits: int, group: int, Dh: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_C): a group's heads, and the splits a combine tile holds."""
    block_g = pow2(group)
    return block_g, max(1, min(pow2(splits), COMBINE_TILE // (block_g * Dh)))


def fused_combine(splits: int, group: int, Dh: int) -> bool:
    """Whether the split kernel combines the splits itself (device.decode_fusion("combine"), and
    at most FUSED_COMBINE_TILES tiles of the group's partials for its last program, a group's
    heads within one tile: wider groups cost the split kernel registers)."""
    block_g, block_c = combine_tiles(splits, group, Dh)
    return splits > 1 and decode_fusion("combine") and block_g * Dh <= COMBINE_TILE and (
        splits <= FUSED_COMBINE_TILES * block_c)


@torch.library.custom_op("dropless::decode_attention", mutates_args=())
def decode_attention(q_bHD: Tensor, k_cache: Tensor, v_cache: Tensor, positions_b: Tensor,
                     length: int, splits: int = 0) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q [b, H, Dh] (one token per row) over each row's cache
    positions [0, min(position + 1, length)) of k_cache, v_cache [b, G, S, Dh]: what SDPA returns
    with decode.make_step's additive mask. The engine's decoding rows have position < length;
    a row past it (the scratch row at S - 1) sees all of [0, length) and gets finite garbage.
    Positions int64 [b]. `splits`: key chunks per (row, kv head), 0 to choose by num_splits.
    Softmax in float32; out in q's dtype."""
    b, H, Dh = q_bHD.shape
    G, S = k_cache.shape[1], k_cache.shape[2]
    assert H % G == 0 and Dh & (Dh - 1) == 0 and 1 <= length <= S and v_cache.shape == \
        k_cache.shape and q_bHD.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1
    if splits <= 0:
        programs = 2 * num_sms(q_bHD.device.index) if q_bHD.is_cuda else CPU_PROGRAMS
        splits = num_splits(b, G, length, programs)
    chunk = _cdiv(_cdiv(length, splits), BLOCK_N) * BLOCK_N   # a whole number of tiles
    splits = _cdiv(length, chunk)   # every chunk starts below length
    out = q_bHD.new_empty(b, H, Dh)
    direct = splits == 1
    if direct:   # not read
        m = l = acc = out
    else:
        m, l = (q_bHD.new_empty(b, H, splits, dtype=torch.float32) for _ in range(2))
        acc = q_bHD.new_empty(b, H, splits, Dh, dtype=torch.float32)
    block_g, block_c = combine_tiles(splits, H // G, Dh)
    combine = not direct and fused_combine(splits, H // G, Dh)
    kernels = _kernels()
    kernels.decode_split_kernel[(b, G, splits)](
        q_bHD, k_cache, v_cache, positions_b, out, m, l, acc,
        length, chunk, math.log2(math.e) / math.sqrt(Dh),
        q_bHD.stride(0), q_bHD.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        GROUP=H // G, DH=Dh, BLOCK_H=max(16, block_g), BLOCK_N=BLOCK_N,
        DIRECT=direct, DOT_PRECISION=_precision(q_bHD),
        cnt_ptr=counters(q_bHD.device, b * G) if combine else out, COMBINE=combine,
        BLOCK_G=block_g, BLOCK_C=block_c, num_warps=4, **pdl_launch(q_bHD.device))
    if not direct and not combine:
        kernels.decode_combine_kernel[(b * H,)](
            m, l, acc, out, splits, DH=Dh,
            BLOCK_C=combine_tiles(splits, 1, Dh)[1], num_warps=4,
            **pdl_launch(q_bHD.device))
    return out


@decode_attention.register_fake
def _(q_bHD, k_cache, v_cache, positions_b, length, splits=0):
    return q_bHD.new_empty(q_bHD.shape)
