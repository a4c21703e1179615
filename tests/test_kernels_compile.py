"""The int4 kernels compiled for an H100 (sm_90) on a machine without a GPU: Triton's compiler and
ptxas, not the interpreter. The interpreter runs Python, so it takes code the compiler refuses
(round 25: a starred shape in a jitted helper passed every CPU test and failed every int4 test on
the GPU). Each case compiles in a subprocess without TRITON_INTERPRET (the CPU tests' setting)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# not imported here: importing triton before triton_env sets TRITON_INTERPRET leaves the other
# kernel tests' kernels compiled for a GPU, on a machine without one
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

COMPILE = r'''
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dropless.ops import triton_awq_kernels, triton_gemv_kernels

def compile_one(module, name, constexprs, pointers, warps, stages):
    fn = getattr({"awq": triton_awq_kernels, "gemv": triton_gemv_kernels}[module], name)
    params = inspect.signature(fn.fn).parameters
    signature, consts = {}, {}
    for i, (p, param) in enumerate(params.items()):
        if "constexpr" in str(param.annotation) or p in constexprs:
            signature[p] = "constexpr"
            consts[(i,)] = constexprs.get(p, param.default)
        elif p.endswith("_ptr"):
            signature[p] = pointers.get(p, "*i32")
        else:
            signature[p] = "fp32" if p == "eps" else "i32"
    kernel = triton.compile(ASTSource(fn, signature, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    assert "cubin" in kernel.asm, list(kernel.asm)

for case in json.loads(sys.argv[1]):
    compile_one(*case)
print("compiled", len(json.loads(sys.argv[1])))
'''

ACT = {"a_ptr": "*bf16", "c_ptr": "*bf16", "sc_ptr": "*bf16", "scale_ptr": "*fp32"}
GROUPED = dict(GS=128, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, DENSE=False, GATHER=True,
               SCATTER=False, SCALE=False, SWIGLU=True, DOT_PRECISION="tf32",
               GATHER_UNPACK=False, PACKED=True)
GEMV = dict(GS=128, BLOCK_K=32, BLOCK_N=128, SPLIT_K=4, HAS_EXPERT=True, SCALE=False,
            GU_SPLIT=0, UNROLL=4, STAGES=1, TOTAL=False, HAS_RES=False, BLOCK_J=1)
GEMV_PTRS = {"x_ptr": "*bf16", "out_ptr": "*fp32", "sc_ptr": "*bf16", "scale_ptr": "*fp32",
             "total_ptr": "*bf16", "res_ptr": "*bf16", "norm_ptr": "*bf16"}

CASES = {
    # the grouped kernel, every unpacking: gate|up (gather, SwiGLU), down (scale, scatter), a
    # dense linear, 16-row tiles (mma.sync) and 64-row ones (wgmma), fp32 activations
    "grouped packed gate|up": ("awq", "awq_grouped_kernel", GROUPED, ACT, 4, 3),
    "grouped packed down": ("awq", "awq_grouped_kernel", {
        **GROUPED, "SWIGLU": False, "GATHER": False, "SCALE": True, "SCATTER": True,
        "BLOCK_M": 16, "BLOCK_K": 128}, ACT, 4, 3),
    "grouped packed dense fp32": ("awq", "awq_grouped_kernel", {
        **GROUPED, "DENSE": True, "SWIGLU": False, "GATHER": False, "DOT_PRECISION": "ieee",
        "BLOCK_M": 32}, {"a_ptr": "*fp32", "c_ptr": "*fp32", "sc_ptr": "*fp32"}, 4, 3),
    "grouped interleave": ("awq", "awq_grouped_kernel", {**GROUPED, "PACKED": False}, ACT, 4, 3),
    "grouped gather": ("awq", "awq_grouped_kernel",
                       {**GROUPED, "PACKED": False, "GATHER_UNPACK": True}, ACT, 4, 3),
    # the decode GEMVs: int4 nibble by nibble (split partials, then the slot sum), and SwiGLU
    "gemv nibble": ("gemv", "gemv_nibble_kernel", GEMV, GEMV_PTRS, 4, 1),
    "gemv nibble summed": ("gemv", "gemv_nibble_kernel", {
        **GEMV, "GU_SPLIT": 2, "SCALE": True, "TOTAL": True, "HAS_RES": True, "BLOCK_J": 8},
        {**GEMV_PTRS, "x_ptr": "*fp32"}, 4, 1),
    "gemv int4 swiglu": ("gemv", "gemv_kernel", {
        **GEMV, "BLOCK_N": 64, "SPLIT_K": 1, "QUANT": True, "SWIGLU": True, "MASK_K": False,
        "GATHER_UNPACK": False}, {**GEMV_PTRS, "out_ptr": "*bf16"}, 4, 1),
}


def test_int4_kernels_compile_for_sm90():
    cases = json.dumps(list(CASES.values()))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, cases], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-1] == str(len(CASES))
