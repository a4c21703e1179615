"""The decode step's dense projection kernel (dropless/ops/triton_linear.py) against the torch ops it
replaces in dropless/serve/decode.py: F.rms_norm then F.linear, and addmm with the residual.

On a GPU when there is one, else on the CPU under the Triton interpreter (bf16 on CUDA only, as the
other kernels' tests)."""

import pytest
import torch
import torch.nn.functional as F

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton

from dropless.ops import triton_linear
from dropless.ops.triton_linear import linear_rows
from tests.conftest import rel_err


def reference(x, w, norm_w, eps, residual):
    if norm_w is not None:   # decode.rms_norm's value: float32 statistics, rounded to x's dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), norm_w.float(), eps).to(x.dtype)
    y = x.float() @ w.float().t()
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def check(T, N, K, dtype, norm, res, eps=1e-6, x=None):
    g = torch.Generator(device="cpu").manual_seed(T * 1000 + N + K)
    x = torch.randn(T, K, generator=g).to(DEVICE, dtype) if x is None else x
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(K, generator=g)).to(DEVICE, dtype) if norm else None
    residual = torch.randn(T, N, generator=g).to(DEVICE, dtype) if res else None
    out = linear_rows(x, w, norm_w, eps, residual)
    ref = reference(x, w, norm_w, eps, residual)
    assert out.shape == (T, N) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,res", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("T,N,K", [(1, 64, 128), (1, 100, 70), (3, 48, 300), (8, 5, 16),
                                   (2, 33, 1000)])
def test_linear_rows_matches_torch(T, N, K, dtype, norm, res):
    """K and N not multiples of the blocks; T not a power of two; a norm and a residual or not."""
    check(T, N, K, dtype, norm, res)


@pytest.mark.parametrize("T", [1, 5])
def test_linear_rows_tiles_as_on_a_gpu(T, monkeypatch):
    """The grid as laid out for 132 multiprocessors: the output blocks shrink to fill it, the
    reduction blocks grow to keep the tile, several reduction steps per iteration."""
    monkeypatch.setattr(triton_linear, "_num_sms", lambda device: 132)
    block_t, block_n, block_k, unroll = triton_linear.tiles(T, 2048, 4096, 132)
    assert block_n < triton_linear.MAX_BLOCK_N and block_k * block_n * block_t == \
        triton_linear.TILE and unroll > 1
    check(T, 200, 1100, torch.float32, True, True)


def preload(monkeypatch, module) -> list:
    """The module's launches with PRELOAD (the first weight step loaded before the PDL wait): on
    CUDA with PDL as the switches give it, elsewhere PRELOAD alone (the interpreter has no PDL).
    Returns the launch options each launch asked for (a launcher that stopped asking for the
    preload would leave the test checking nothing new)."""
    from dropless.ops.device import pdl_launch
    if DEVICE == "cuda":
        monkeypatch.setenv("DROPLESS_PDL", "1")
        monkeypatch.setenv("DROPLESS_PDL_PRELOAD", "1")
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("PDL needs sm_90")
    asked = []

    def launch(device, preload=False):
        options = pdl_launch(device, preload) if DEVICE == "cuda" else (
            {"PRELOAD": True} if preload else {})
        asked.append(options)
        return options
    monkeypatch.setattr(module, "pdl_launch", launch)
    return asked


@pytest.mark.parametrize("T,N,K,norm,res", [(1, 64, 128, True, True), (1, 100, 70, False, True),
                                            (3, 48, 300, True, False), (2, 33, 1000, True, True)])
def test_linear_rows_preloaded_first_step(T, N, K, norm, res, monkeypatch):
    """PRELOAD: the first BLOCK_K of weights read before the PDL wait, then the loop from there
    (K under, over and not a multiple of the block); also with the tiles of 132 multiprocessors
    (a whole reduction in one unrolled iteration)."""
    asked = preload(monkeypatch, triton_linear)
    check(T, N, K, torch.float32, norm, res)
    monkeypatch.setattr(triton_linear, "_num_sms", lambda device: 132)
    check(T, 200, 1100, torch.float32, norm, res)
    assert len(asked) == 2 and all(options.get("PRELOAD") for options in asked)


def test_linear_rows_strided_rows_and_mixed_dtypes():
    """x rows at a stride (a view of a wider tensor), the norm weight in float32 over fp16 x (the
    module's upcast path), a residual that is a view too."""
    wide = torch.randn(4, 96, device=DEVICE, dtype=torch.float16)
    x = wide[:, :64]
    w = torch.randn(40, 64, device=DEVICE, dtype=torch.float16) / 8
    norm_w = torch.rand(64, device=DEVICE) + 0.5
    residual = torch.randn(4, 80, device=DEVICE, dtype=torch.float16)[:, 20:60]
    out = linear_rows(x, w, norm_w, 1e-5, residual)
    assert rel_err(out, reference(x, w, norm_w, 1e-5, residual)) < TOL[torch.float16]


def test_linear_rows_norm_of_zero_row_and_large_values():
    """A zero row normalises to zero (rsqrt(eps) times 0), not NaN; large activations keep their
    statistics in float32 (their squares overflow fp16)."""
    x = torch.zeros(2, 128, device=DEVICE, dtype=torch.float16)
    x[1] = 300.0
    check(2, 32, 128, torch.float16, True, False, x=x)


def test_linear_rows_refuses_more_rows_than_its_tile():
    x = torch.randn(triton_linear.MAX_ROWS + 1, 16, device=DEVICE)
    with pytest.raises(AssertionError):
        linear_rows(x, torch.randn(8, 16, device=DEVICE), None, 0.0, None)


def test_linear_rows_strided_norm_weight_and_wrong_shapes():
    """A norm weight that is a strided view is read as its values (the kernel indexes it as
    contiguous); a residual or norm weight of the wrong shape is refused, not read past its end."""
    g = torch.Generator(device="cpu").manual_seed(7)
    x = torch.randn(2, 64, generator=g).to(DEVICE)
    w = (torch.randn(24, 64, generator=g) / 8).to(DEVICE)
    norm_w = (1 + torch.rand(128, generator=g)).to(DEVICE)[::2]
    assert not norm_w.is_contiguous()
    out = linear_rows(x, w, norm_w, 1e-6, None)
    assert rel_err(out, reference(x, w, norm_w, 1e-6, None)) < TOL[torch.float32]
    with pytest.raises(AssertionError):
        linear_rows(x, w, None, 0.0, torch.randn(1, 24, device=DEVICE))   # [1, N] would broadcast
    with pytest.raises(AssertionError):
        linear_rows(x, w, torch.ones(32, device=DEVICE), 1e-6, None)
