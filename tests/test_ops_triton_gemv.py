"""The decode expert GEMV kernels against the training path of the MoE layer.

On a GPU when there is one, else on the CPU under the Triton interpreter (fp32/fp16 only)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are first imported
pytest.importorskip("triton")

from dropless import MoE, MoEConfig  # noqa: E402
from dropless.serve.moe_decode import moe_decode  # noqa: E402
from tests.conftest import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,F,E,K", [(1, 64, 96, 8, 2), (3, 40, 24, 4, 4), (2, 128, 64, 16, 3)])
def test_gemv_path_matches_training_path(dtype, T, D, F, E, K):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=D, hidden_dim=F, num_experts=E, top_k=K, num_shared_experts=1))
    moe = moe.to(DEVICE, dtype).eval()
    x = torch.randn(T, D, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref, _ = moe(x)
        out = moe_decode(moe, x, "triton")
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
