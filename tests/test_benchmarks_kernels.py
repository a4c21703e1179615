"""The Triton kernels' benchmark scripts as a user smoke-tests them on a CPU: each its docstring's
command (with the kernel paths it skips added), under TRITON_INTERPRET=1, in fp32 (the scripts'
CPU dtype: the interpreter's bf16 is wrong, tests/triton_env.py). As in tests/test_benchmarks.py
(whose docstring lists the scripts left out): every row there, times positive, and the
correctness columns within fp32's tolerance. The interpreter takes ~0.05-0.6 s a kernel call, so
the throughputs print as 0 here: only finite.
"""

import importlib.util
import math
import re

import pytest

from test_benchmarks import positive, run, table

# found, not imported: importing triton in this process before tests/triton_env.py sets
# TRITON_INTERPRET (this module is collected before the kernel tests) compiles every later kernel
# test's kernels for a GPU, on a machine without one
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRET = {"TRITON_INTERPRET": "1"}


def test_decode_attention_kernel_matches_sdpa():
    """The split-KV kernel against SDPA with the step's mask: one split at 64 keys, several at 160
    (the partials and their combine), a second row at a random position (the mask)."""
    out = run("decode_attention.py", "--device", "cpu", "--batches", 1, 2, "--lengths", 64, 160,
              env=INTERPRET)
    assert "H 32, G 4, Dh 128, torch.float32, cpu, " in out
    rows = table(out, "   b  length")
    assert [row[:2] for row in rows] == [["1", "64"], ["1", "160"], ["2", "64"], ["2", "160"]]
    for _, length, splits, sdpa_us, triton_us, sdpa_gbps, triton_gbps, diff in rows:
        assert (int(splits) > 1) == (length == "160"), rows
        assert positive(float(sdpa_us), float(triton_us))
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in (sdpa_gbps, triton_gbps))
        assert 0 <= float(diff) < 1e-5, rows   # fp32: rounding alone


def test_decode_linear_kernel_matches_torch():
    """linear_rows against the torch ops: rms_norm + q|k|v, and o_proj + the residual."""
    out = run("decode_linear.py", "--device", "cpu", "--shapes", "cpu", "--tokens", 1,
              env=INTERPRET)
    rows = table(out, "shape     T op")
    assert [row[:3] for row in rows] == [["cpu", "1", "norm+qkv"], ["cpu", "1", "o_proj+res"]]
    for *_, torch_us, kernel_us, speedup, gbps, err in rows:
        t_ref, t = float(torch_us), float(kernel_us)
        assert positive(t_ref, t) and abs(float(speedup) - t_ref / t) < 0.01
        assert math.isfinite(float(gbps)) and float(gbps) >= 0
        assert 0 <= float(err) < 1e-5, rows   # fp32, relative to the output's norm


def test_router_kernels_agree_with_the_torch_ops():
    """route_topk against route's torch ops: the same experts per token, weights within 1e-5."""
    out = run("router.py", "--preset", "tiny", "--device", "cpu", "--tokens", 1, 3,
              env=INTERPRET)
    assert out.startswith("tiny: D 128, E 8, K 2, torch.float32, cpu, ")
    rows = table(out, "   T  torch us")
    assert [row[0] for row in rows] == ["1", "3"]
    for _, torch_us, triton_us, agrees in rows:
        assert positive(float(torch_us), float(triton_us)) and agrees == "True", rows


def test_gemv_int4_layout_kernels_match_the_current_path():
    """--check-only (no timing: every us and TB/s is nan): both k-major int4 kernels against the
    engine's int4 GEMV on the same codes, and the bf16 k-major path on the unquantized weights."""
    out = run("gemv_int4_layout.py", "--device", "cpu", "--shapes", "cpu", "--gate-up", "2,64,4",
              "--down", "2,64,4", "--check-only", "--kernels", "words", "elementwise",
              env=INTERPRET)
    rows = {" ".join(m[1].split()): (m[2], m[3], float(m[4])) for m in re.finditer(
        r"^cpu +(.+?) +(\S+) us +(\S+) TB/s +(\S+)$", out, re.M)}
    tiles = "2,64,4 | 2,64,4"
    assert list(rows) == ["bf16 kmajor", "int4 current", f"int4 words {tiles}",
                          f"int4 elementwise {tiles}"], out   # a refused tile prints no row
    assert all(us == tbs == "nan" for us, tbs, _ in rows.values())
    errs = {kind: err for kind, (_, _, err) in rows.items()}
    assert errs["int4 current"] == 0   # the reference itself
    # the same codes in fp32 (h is not rounded between the GEMVs here): rounding alone
    assert errs[f"int4 words {tiles}"] < 1e-5 and errs[f"int4 elementwise {tiles}"] < 1e-5
    # int4 in groups of 128 of Gaussian weights: ~0.10 a weight, through gate, up and down
    assert 0.1 < errs["bf16 kmajor"] < 0.25, errs


def test_dispatch_ops_times_every_op_and_both_sort_keys():
    """dispatch_ops.py: every op timed, and each layer configuration's ratio is the dense time
    over its own."""
    out = run("dispatch_ops.py", "--device", "cpu", "--shapes", "cpu-tiny", "--repeats", 2,
              env=INTERPRET)

    def cells(header):
        lines = out[out.index(header):].splitlines()[2:]
        lines = lines[:lines.index("") if "" in lines else None]
        return [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    ops_rows = cells("| op | us |")
    assert len(ops_rows) == 4 + 2 + 2 + 2, ops_rows
    assert [r[0] for r in ops_rows[6:8]] == ["gather: x[idx]", "gather: index_select"]
    assert positive(*(float(r[1]) for r in ops_rows))
    layer = cells("| provider | sort keys |")
    assert [r[:2] for r in layer] == [["dense_equiv", "-"], ["grouped_fused", "int64"],
                                      ["grouped_mm", "int64"], ["grouped_fused", "narrowed"],
                                      ["grouped_mm", "narrowed"]]
    dense = float(layer[0][2])
    for label, _, median, ratio, runs in layer:
        times = [float(t) for t in runs.split(",")]
        assert len(times) == 2 and positive(*times), layer
        assert abs(float(ratio) - dense / float(median)) < 2e-3, layer
