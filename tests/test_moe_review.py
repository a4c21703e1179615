"""Edge cases an adversarial review of the MoE layer found: the layer against an independent
per-token reference (routing included), the selection bias under a dtype change, and a capacity
layer compiled whole."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from dropless import MoE, MoEConfig, ModelConfig, Transformer


def make(**kw):
    torch.manual_seed(0)
    return MoE(MoEConfig(**{**dict(dim=16, hidden_dim=32, num_experts=8, top_k=2), **kw}))


def per_token_reference(moe, x_TD):
    """y, balance and z losses in float64 with routing written out token by token (independent of
    dropless.router, plain autograd): DeepSeek-V3 group limit, selection bias, renormalisation,
    route_scale. Also returns the float64 copy of `moe` whose parameters get the gradients."""
    cfg, m = moe.cfg, copy.deepcopy(moe).double()
    x = x_TD.double()
    logits = x @ m.router.weight.T
    s = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
    p = s / s.sum(-1, keepdim=True)
    ys, ids = [], []
    for t in range(x.shape[0]):
        sel = s[t].detach() + (0 if m.router.bias is None else m.router.bias.double())
        allowed = range(cfg.num_experts)
        if cfg.num_groups:
            n = cfg.num_experts // cfg.num_groups
            best = torch.stack([sel[g * n:(g + 1) * n].topk(min(2, n)).values.sum()
                                for g in range(cfg.num_groups)]).topk(cfg.topk_groups).indices
            allowed = [e for e in allowed if e // n in best.tolist()]
        chosen = sorted(allowed, key=lambda e: -float(sel[e]))[:cfg.top_k]
        w = s[t, chosen] / (s[t, chosen].sum() if cfg.norm_topk_prob else 1) * cfg.route_scale
        y = 0
        for wk, e in zip(w, chosen):
            g, u = (x[t] @ m.experts.gate_up[e]).chunk(2)
            y = y + wk * ((F.silu(g) * u) @ m.experts.down[e])
        ys.append(y)
        ids.extend(chosen)
    f = torch.bincount(torch.tensor(ids), minlength=cfg.num_experts).double() / len(ids)
    bal = cfg.balance_loss_coef * cfg.num_experts * (f * p.mean(0)).sum()
    z = cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    return torch.stack(ys), bal, z, m


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_experts=4, top_k=4),
    dict(top_k=3, num_groups=4, topk_groups=2),
    dict(score_func="sigmoid", bias_update_rate=1e-3, num_groups=8, topk_groups=3, route_scale=2.5),
    dict(score_func="sigmoid", norm_topk_prob=False, route_scale=2.5),
])
@pytest.mark.parametrize("backend", ["reference", "grouped", "grouped_lowmem"])
def test_layer_matches_per_token_reference(kw, backend):
    moe = make(backend=backend, z_loss_coef=1e-3, **kw)
    if moe.router.bias is not None:
        moe.router.bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(9, 16, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    dy = torch.randn(9, 16)
    y, aux = moe(x)
    y_ref, bal, z, m64 = per_token_reference(moe, x64)
    assert rel_err(y, y_ref) < 1e-5
    assert aux.balance_loss.item() == pytest.approx(bal.item(), rel=1e-5)
    assert aux.z_loss.item() == pytest.approx(z.item(), rel=1e-5)
    # gradients, the router's included (its backward is hand-written: router._UpcastLinear)
    ((y * dy).sum() + aux.balance_loss + aux.z_loss).backward()
    ((y_ref * dy.double()).sum() + bal + z).backward()
    assert rel_err(x.grad, x64.grad) < 1e-5
    assert rel_err(moe.router.weight.grad, m64.router.weight.grad) < 1e-5
    for name in ("gate_up", "down"):
        assert rel_err(getattr(moe.experts, name).grad, getattr(m64.experts, name).grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_bias_stays_fp32_when_the_model_goes_low_precision(dtype):
    """A trained run served in bf16 (`load_model_dir(..., dtype)` -> model.to) kept its selection
    bias rounded to bf16 (2^-8 near 1), which changed the experts it picked; from_hf already kept
    the bias float32."""
    moe = make(score_func="sigmoid", bias_update_rate=1e-3)
    moe.router.bias.copy_(1 + torch.randn(8) * 0.3)
    bias = moe.router.bias.clone()
    moe.to(dtype)
    assert moe.router.bias.dtype == torch.float32 and torch.equal(moe.router.bias, bias)
    assert moe.router.weight.dtype == dtype
    assert moe.state_dict()["router.bias"].dtype == torch.float32
    moe.double()   # wider dtypes still apply
    assert moe.router.bias.dtype == torch.float64
    cfg = ModelConfig(dim=16, num_layers=2, num_heads=2, num_kv_heads=2,
                      moe=MoEConfig(dim=16, hidden_dim=32, bias_update_rate=1e-3))
    model = Transformer(cfg).to(dtype)
    assert all(m.router.bias.dtype == torch.float32 for m in model.moe_layers())


def test_capacity_layer_compiles_fullgraph():
    """A capacity plan's row count is data-dependent: combine's `R == 0` test broke a
    fullgraph compile of the layer (the README promises a whole block compiles so)."""
    moe = make(capacity_factor=1.0, backend="grouped")
    compiled = torch.compile(copy.deepcopy(moe), fullgraph=True)
    x = torch.randn(7, 16)
    outs = []
    for run in (moe, compiled):
        xi = x.clone().requires_grad_(True)
        y, aux = run(xi)
        (y.square().sum() + aux.balance_loss).backward()
        outs.append((y, xi.grad, aux.dropped))
    (y0, g0, d0), (y1, g1, d1) = outs
    assert d0 == d1 > 0
    assert rel_err(y1, y0) < 1e-5 and rel_err(g1, g0) < 1e-5
