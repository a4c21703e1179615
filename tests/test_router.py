"""The router's hand-written autograd function against plain autograd (the layer tests' oracle
routes through it too, so only this test would see a wrong backward)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from dropless.router import _UpcastLinear


@pytest.mark.parametrize("x_dtype,w_dtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_upcast_linear_matches_autograd(x_dtype, w_dtype, autocast):
    """Same logits and the same x and weight gradients (in their own dtypes) as autograd through
    F.linear on upcast copies; under bf16 autocast too, where the logits stay float32."""
    torch.manual_seed(0)
    x0 = torch.randn(13, 24).to(x_dtype)
    w0 = torch.randn(6, 24).to(w_dtype)
    dtype = torch.promote_types(x_dtype, torch.float32)
    dlogits = torch.randn(13, 6, dtype=dtype)
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    x_ref, w_ref = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    ref = F.linear(x_ref.to(dtype), w_ref.to(dtype))
    ref.backward(dlogits)
    region = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with region:
        out = _UpcastLinear.apply(x, w, dtype)
        out.backward(dlogits)
    assert out.dtype == dtype
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
