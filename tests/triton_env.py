"""Where the Triton kernel tests run: on the GPU when there is one, else on the CPU under the Triton
interpreter, which must be switched on before the kernels are first imported (import this module
before any dropless kernel). The interpreter's bf16 arithmetic is wrong: bf16 is tested on CUDA only."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
