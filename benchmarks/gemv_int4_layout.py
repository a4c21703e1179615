"""Would a k-major int4 layout do for the int4 decode experts what it did for bf16 (round 22:
1.27x)? The int4 experts are packed as AutoAWQ packs them (qweight [E, in, out/8]: eight output
columns per int32), so a batch-1 GEMV program reads short runs of many rows, as the bf16 training
layout did. This times, at one token, in CUDA graphs of CALLS calls that each route to their own
draw of experts (gemv_tiles.py's method):

  current  dropless.ops.gemv.decode_experts on the AutoAWQ packing (the engine's int4 path)
  kmajor   two kernels on a k-major repacking of the same codes: per expert, qweight [out, in/8]
           (eight consecutive inputs per int32, input k in bits 4 (k % 8)), and scales and zero
           points [out, in/G] in the scales' dtype. gate|up with SwiGLU, then down summing the K
           slots with their routing weights in the same program, in two versions:
           words        per packed int32 (eight inputs of one row and group), the sum of
                        (q - z) x over its nibbles, then times the scale: the library's int4
                        trick (a nibble left in place, OR-ed under 2^23's exponent), so a weight
                        costs one LOP3, one FADD and one FFMA;
           elementwise  each weight dequantized, s (q - z), the products summed once after the
                        loop (round 23: 2x slower than `current` on an H100).

for a sweep of tiles (BLOCK_N rows, BLOCK_K inputs, warps; BLOCK_K a multiple of 8), each
output compared with `current` ("err": the same codes, so rounding alone; h is rounded to bf16
between the GEMVs, as in the bf16 k-major path). Also the bf16 k-major GEMVs (the engine's bf16
path) on the same weights unquantized, for issue 12's ratio (int4 over bf16 at batch 1); its err
is the quantization's.

    python benchmarks/gemv_int4_layout.py                        # H100/H200: ~1 minute
    TRITON_INTERPRET=1 python benchmarks/gemv_int4_layout.py --device cpu --shapes cpu \
        --gate-up 2,64,4 --down 2,64,4 --check-only              # smoke: outputs, no timing
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from dropless.ops import gemv
from dropless.quant.pack import unpack
from gemv_tiles import CALLS, GROUP, expert_weights, quantized, repeated, start
from moe_layer import bench


@triton.jit
def _products(qw, z, s, rows, x_ptr, k0, W8, NG, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K / 8, 8]: w[n, k] x[k] for these rows of one expert's (qweight,
    scales, zeros) and inputs k = k0 .. k0 + BLOCK_K, w = s (q - z). Summed by the caller once,
    after its loop: a reduction per step (round 22's first version) kept the kernel 4-5x slower
    than the current int4 path. The scales and zero points are loaded per packed int32 (eight
    inputs of one group), mostly from cache; a nibble q becomes the float 2^23 + q by one OR."""
    js = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    xv = tl.load(x_ptr + js[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.float32)
    words = tl.load(qw + rows[:, None] * W8 + js[None, :])                # [BN, BK / 8]
    g = rows[:, None] * NG + (js * 8 // G)[None, :]
    sc = tl.load(s + g).to(tl.float32)
    zp = tl.load(z + g).to(tl.float32) + 8388608.0
    q = ((words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 15) | 0x4B000000
    w = (q.to(tl.float32, bitcast=True) - zp[:, :, None]) * sc[:, :, None]
    return w * xv[None, :, :]


@triton.jit
def _nibble(v, J: tl.constexpr):
    """fp32 2^23 + nibble_J(v) * 16^J (J < 4), by one logic op (the library's int4 GEMV trick)."""
    return ((v & (0xF << (4 * J))) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _word_sums(qw, z, s, rows, x_ptr, k0, W8, NG, G: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_K / 8]: per packed int32 (eight consecutive inputs of one row, one
    group), s * sum_j (q_j - z) x_j. Nibble j stays in place (_nibble: the word shifted by 16 once
    for j >= 4), its power of 16 divided out of x_j: a weight costs one LOP3, one FADD and one
    FFMA, as in the library's int4 GEMV; the scale one FFMA per eight weights."""
    js = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw + rows[:, None] * W8 + js[None, :])                # [BN, BK / 8]
    g = rows[:, None] * NG + (js * 8 // G)[None, :]
    sc = tl.load(s + g).to(tl.float32)
    zp = tl.load(z + g).to(tl.float32)
    hi = words >> 16
    t = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        zz = 8388608.0 + zp * (1 << (4 * j))
        lo_x = tl.load(x_ptr + js * 8 + j).to(tl.float32) * (1.0 / (1 << (4 * j)))
        hi_x = tl.load(x_ptr + js * 8 + 4 + j).to(tl.float32) * (1.0 / (1 << (4 * j)))
        t += lo_x[None, :] * (_nibble(words, j) - zz)
        t += hi_x[None, :] * (_nibble(hi, j) - zz)
    return t * sc


@triton.jit
def _zeros(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr):
    """A program's accumulator: per packed int32 with WORDS, else per weight."""
    if WORDS:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8, 8), dtype=tl.float32)
    return acc


@triton.jit
def _step(qw, z, s, rows, x_ptr, k0, W8, NG, G: tl.constexpr, BLOCK_K: tl.constexpr,
          WORDS: tl.constexpr):
    """One reduction step into the accumulator's shape: _word_sums with WORDS, else _products."""
    if WORDS:
        v = _word_sums(qw, z, s, rows, x_ptr, k0, W8, NG, G, BLOCK_K)
    else:
        v = _products(qw, z, s, rows, x_ptr, k0, W8, NG, G, BLOCK_K)
    return v


@triton.jit
def _row_sums(acc, WORDS: tl.constexpr):
    """[BLOCK_N]: the accumulator summed once, after the loop."""
    if WORDS:
        total = tl.sum(acc, axis=1)
    else:
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
    return total


@triton.jit
def int4_gate_up_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, ids_ptr, h_ptr, F, D, K: tl.constexpr,
                        G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        WORDS: tl.constexpr):
    """h[r, n] = silu(W[n] . x) * (W[F + n] . x), W the int4 gate|up [2F, D] of expert ids[r]."""
    r = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(ids_ptr + r).to(tl.int64)
    W8, NG = D // 8, D // G
    qw, s, z = qw_ptr + e * 2 * F * W8, s_ptr + e * 2 * F * NG, z_ptr + e * 2 * F * NG
    x_row = x_ptr + (r // K) * D
    gate = _zeros(BLOCK_N, BLOCK_K, WORDS)
    up = _zeros(BLOCK_N, BLOCK_K, WORDS)
    for k0 in range(0, D, BLOCK_K):
        gate += _step(qw, z, s, ns, x_row, k0, W8, NG, G, BLOCK_K, WORDS)
        up += _step(qw, z, s, ns + F, x_row, k0, W8, NG, G, BLOCK_K, WORDS)
    gs = _row_sums(gate, WORDS)
    us = _row_sums(up, WORDS)
    tl.store(h_ptr + r * F + ns, (gs * tl.sigmoid(gs) * us).to(h_ptr.dtype.element_ty))


@triton.jit
def int4_down_kernel(h_ptr, qw_ptr, s_ptr, z_ptr, ids_ptr, wr_ptr, y_ptr, F, D, K: tl.constexpr,
                     G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     WORDS: tl.constexpr):
    """y[t, n] = sum_k wr[t K + k] * (W_{ids[t K + k]}[n] . h[t K + k]), W the int4 down [D, F]."""
    t = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    W8, NG = F // 8, F // G
    y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in tl.static_range(K):
        r = t * K + k
        e = tl.load(ids_ptr + r).to(tl.int64)
        qw, s, z = qw_ptr + e * D * W8, s_ptr + e * D * NG, z_ptr + e * D * NG
        acc = _zeros(BLOCK_N, BLOCK_K, WORDS)
        for k0 in range(0, F, BLOCK_K):
            acc += _step(qw, z, s, ns, h_ptr + r * F, k0, W8, NG, G, BLOCK_K, WORDS)
        y += tl.load(wr_ptr + r).to(tl.float32) * _row_sums(acc, WORDS)
    tl.store(y_ptr + t * D + ns, y.to(y_ptr.dtype.element_ty))


def kmajor_int4(packed):
    """AutoAWQ-packed (qweight [E, I, O/8], qzeros [E, I/G, O/8], scales [E, I/G, O]) -> the same
    codes k-major: (qweight int32 [E, O, I/8], scales [E, O, I/G], zeros [E, O, I/G] in the
    scales' dtype, exact)."""
    qweight, qzeros, scales = packed
    codes = unpack(qweight).transpose(1, 2).to(torch.int64)          # [E, O, I]
    E, O, I = codes.shape
    runs = codes.reshape(E, O, I // 8, 8) << (4 * torch.arange(8, device=codes.device))
    words = runs.sum(-1)                                              # < 2^32: no carries
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zeros = unpack(qzeros).transpose(1, 2).to(scales.dtype).contiguous()
    return words.contiguous(), scales.transpose(1, 2).contiguous(), zeros


def int4_kmajor_experts(x, ids, wr, gate_up, down, tile, words=False):
    """The decode experts on kmajor_int4 weights; tile = (gate_up BN, BK, warps, down BN, BK,
    warps); `words`: by per-word sums (_word_sums), else elementwise (_products)."""
    T, D = x.shape
    K = ids.shape[1]
    F = down[0].shape[2] * 8
    G = D // gate_up[1].shape[2]   # (qweight, scales [E, 2F, D/G], zeros)
    gbn, gbk, gw, dbn, dbk, dw = tile
    assert F // down[1].shape[2] == G and F % gbn == 0 and D % dbn == 0 and D % gbk == 0 \
        and F % dbk == 0 and gbk % 8 == 0 and dbk % 8 == 0, "a tile must divide the shape"
    h = x.new_empty(T * K, F)
    ids = ids.reshape(-1).contiguous()
    int4_gate_up_kernel[(T * K, F // gbn)](x, *gate_up, ids, h, F, D, K, G, gbn, gbk,
                                           WORDS=words, num_warps=gw)
    y = torch.empty_like(x)
    int4_down_kernel[(T, D // dbn)](h, *down, ids, wr.reshape(-1).contiguous(), y, F, D, K,
                                    G, dbn, dbk, WORDS=words, num_warps=dw)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3", "mixtral"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gate-up", nargs="+", default=["1,1024,4", "2,1024,4", "1,512,2", "2,512,4",
                                                      "4,512,4", "4,256,4"],
                    metavar="BN,BK,WARPS")
    ap.add_argument("--down", nargs="+", default=["1,256,2", "2,256,4", "4,256,4", "1,128,1",
                                                   "8,128,4"], metavar="BN,BK,WARPS")
    ap.add_argument("--kernels", nargs="+", choices=["words", "elementwise"], default=["words"],
                    help="the k-major kernels' reduction: per-word sums (_word_sums), and/or "
                    "elementwise products summed once (_products: round 23, 2x slower than the "
                    "current path)")
    ap.add_argument("--check-only", action="store_true",
                    help="compare the outputs, time nothing (the interpreter's smoke test)")
    args = ap.parse_args()
    device, dtype = start(args.device, f"T = 1, group {GROUP}; us per call (median; graph of "
                                       f"{CALLS} calls); TB/s of the bytes each layout reads")
    for name in args.shapes:
        (D, F, E, K), gate_up, down = expert_weights(name, device, dtype)
        q = quantized(gate_up, down, device)
        gu4, dn4 = q.gate_up.packed, q.down.packed
        gu4k, dn4k = kmajor_int4(gu4), kmajor_int4(dn4)
        gu_k = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        dn_k = down.transpose(1, 2).contiguous().transpose(1, 2)
        x = torch.randn(1, D, device=device, dtype=dtype)
        wr = torch.rand(1, K, device=device).softmax(-1)
        draws = [torch.randperm(E, device=device)[:K][None] for _ in range(CALLS)]
        ref = gemv.decode_experts(x, draws[0], wr, gu4, dn4).float()
        kbytes = sum(t.numel() * t.element_size() for t in (*gu4k, *dn4k)) / E
        per = {"int4 current": q.nbytes() / E, "int4 elementwise": kbytes, "int4 words": kbytes,
               "bf16 kmajor": 3 * D * F * gate_up.element_size()}
        rows = [("bf16 kmajor", "", lambda d: gemv.decode_experts_kmajor(x, d, wr, gu_k, dn_k)),
                ("int4 current", "", lambda d: gemv.decode_experts(x, d, wr, gu4, dn4))]
        for g, d in itertools.product(args.gate_up, args.down):
            tile = tuple(int(v) for v in (g + "," + d).split(","))
            for kernels in args.kernels:
                rows.append((f"int4 {kernels}", f"{g} | {d}", lambda dr, tile=tile, w=kernels ==
                             "words": int4_kmajor_experts(x, dr, wr, gu4k, dn4k, tile, w)))
        for kind, label, fn in rows:
            try:
                y = fn(draws[0]).float()
                timed = repeated([lambda d=d: fn(d) for d in draws], device)
                us = float("nan") if args.check_only else bench(timed, device) * 1e3 / CALLS
            except Exception as exc:   # a tile the compiler or resources refuse
                print(f"{name:8} {kind} {label}: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            err = ((y - ref).norm() / ref.norm()).item()
            print(f"{name:8} {kind:17}{label:22}{us:9.1f} us {K * per[kind] / us / 1e6:6.2f} TB/s"
                  f"{err:10.1e}", flush=True)


if __name__ == "__main__":
    main()
