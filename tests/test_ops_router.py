"""The fused Triton router against `Router`: same experts, weights and logits gradients.

Runs on a GPU when there is one, else on the CPU under the Triton interpreter (fp32).
"""

import pytest
import torch

from triton_env import DEVICE   # first: it sets up Triton

import torch.nn.functional as F

from dropless import MoEConfig
from dropless.ops import triton_router
from dropless.router import Router



@pytest.mark.parametrize("E,K,kw", [
    (8, 2, dict()),
    (6, 6, dict()),                                                  # K == E, E not a power of 2
    (64, 8, dict(norm_topk_prob=False)),
    (16, 3, dict(score_func="sigmoid", bias_update_rate=1e-2, route_scale=2.5)),
    (1, 1, dict()),
])
def test_fused_router_matches_router(E, K, kw):
    torch.manual_seed(E * 10 + K)
    router = Router(MoEConfig(dim=32, hidden_dim=8, num_experts=E, top_k=K, **kw)).to(DEVICE)
    if router.bias is not None:
        router.bias.copy_(torch.randn(E) * 0.1)
    x = torch.randn(67, 32, device=DEVICE, requires_grad=True)
    dw = torch.randn(67, K, device=DEVICE)
    ref = router(x)
    (dx_ref,) = torch.autograd.grad(ref.weights_TK, x, dw)
    logits = F.linear(x, router.weight)
    weights, ids = triton_router.route_topk(
        logits, K, score_func=router.cfg.score_func, bias_E=router.bias,
        norm_topk_prob=router.cfg.norm_topk_prob, route_scale=router.cfg.route_scale)
    (dx,) = torch.autograd.grad(weights, x, dw)
    assert torch.equal(ids, ref.expert_ids_TK)
    torch.testing.assert_close(weights, ref.weights_TK, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_custom_op_registrations():
    logits = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.dropless.route_topk.default, (logits, None, 2, True, True, 1.0),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
