import math

import pytest
import torch
from conftest import TOLERANCE, oracle, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from dropless import MoE, MoEConfig, ops
from dropless.router import balance_loss

BACKENDS = ["reference", "grouped", "grouped_lowmem"]
# float64 only where the backend runs it: on CPU grouped_mm falls back to the reference for it
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in BACKENDS
                  for d in (torch.float64, torch.float32, torch.bfloat16)
                  if b == "reference" or d != torch.float64]


def make(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=16, hidden_dim=32, num_experts=8, top_k=2, z_loss_coef=1e-3)
    cfg.update(kw)
    return MoE(MoEConfig(**cfg)).to(dtype)


def check_against_oracle(moe, x, dtype):
    # the backend asked for is the one that runs (not a fallback to the oracle's own loop)
    backend = moe.cfg.backend
    assert ops.resolve_backend(backend, x, moe.experts.gate_up, moe.experts.down) == backend
    x = x.detach().requires_grad_(True)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y, aux = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    ((y * g).sum() + aux.balance_loss + aux.z_loss).backward()
    y_ref, grads_ref, gx_ref, ids_ref = oracle(moe, x, g)
    tol = TOLERANCE[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, gx_ref) < tol
    # The router's gradient can be a difference of near-equal terms (top-1 renormalized weights
    # are exactly 1: their gradient cancels to zero), computed in the router's float32: its
    # error is then a few units of roundoff of those terms, token t's |g_t . y_t| |x_t|, not of
    # the small result (relative errors of 2e-4 to 1.5e-3 at top-1 in fp32). Allowed on top of
    # the relative tolerance: 4 units of roundoff of their root sum of squares.
    u = torch.finfo(torch.promote_types(dtype, torch.float32)).eps / 2
    terms_T = ((g.double() * y_ref.double()).flatten(0, -2).sum(-1).abs()
               * x.detach().double().flatten(0, -2).norm(dim=-1))
    for name, p in moe.named_parameters():
        if rel_err(p.grad, grads_ref[name]) < tol:
            continue
        assert name.startswith("router"), name
        ref = grads_ref[name].double()
        err = (p.grad.double() - ref).norm().item()
        allowed = tol * ref.norm().item() + 4 * u * terms_T.norm().item()
        assert err <= allowed, (name, err, allowed)
    kept = torch.bincount(ids_ref[ids_ref >= 0], minlength=moe.cfg.num_experts)
    assert torch.equal(aux.tokens_per_expert.cpu(), kept)
    return aux


CASES = {
    "basic": dict(),
    "single_expert_k1": dict(num_experts=1, top_k=1),
    "k_equals_e": dict(num_experts=4, top_k=4),
    "many_empty_experts": dict(num_experts=32, top_k=1),
    "grouped_routing": dict(num_experts=8, top_k=3, num_groups=4, topk_groups=2),
    "sigmoid_bias": dict(score_func="sigmoid", bias_update_rate=1e-2, route_scale=2.5),
    "no_norm": dict(norm_topk_prob=False),
    "shared": dict(num_shared_experts=2),
    "shared_gate": dict(num_shared_experts=1, shared_gate=True, shared_hidden_dim=24),
    "capacity": dict(capacity_factor=0.5),
}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_oracle(backend, dtype, case):
    moe = make(dtype, backend=backend, **CASES[case])
    if moe.router.bias is not None:
        moe.router.bias.copy_(torch.randn(moe.cfg.num_experts) * 0.1)
    x = torch.randn(3, 7, 16, dtype=torch.float64).to(dtype)
    aux = check_against_oracle(moe, x, dtype)
    if case != "capacity":
        assert aux.dropped == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(backend, top_k):
    moe = make(backend=backend, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[5] = 10.0
        moe.router.weight[2] = 5.0
    x = torch.rand(20, 16) + 0.1
    aux = check_against_oracle(moe, x, torch.float32)
    assert aux.tokens_per_expert[5] == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    check_against_oracle(make(backend=backend), torch.randn(1, 16), torch.float32)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 12), data=st.data())
def test_random_shapes(T, E, data):
    """float64 for the reference; float32 for the grouped_mm backends (float64 would fall back
    to the reference)."""
    K = data.draw(st.integers(1, E))
    backend = data.draw(st.sampled_from(BACKENDS))
    seed = data.draw(st.integers(0, 2**16))
    dtype = torch.float64 if backend == "reference" else torch.float32
    moe = make(dtype, seed=seed, num_experts=E, top_k=K, backend=backend)
    check_against_oracle(moe, torch.randn(T, 16, dtype=torch.float64).to(dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropless_drops_nothing(backend):
    moe = make(backend=backend, num_experts=4)
    with torch.no_grad():
        moe.router.weight[0] = 3.0   # heavily skewed
    y, aux = moe(torch.rand(64, 16))
    assert aux.dropped == 0
    assert int(aux.tokens_per_expert.sum()) == 64 * 2


@pytest.mark.parametrize("num_experts", [2, 256, 257, 2**15, 2**15 + 1])
def test_plan_orders_rows_by_expert_then_slot_at_every_key_width(num_experts):
    """make_plan sorts a narrowed copy of the ids (uint8 / int16 / int32 by E): the rows are the
    slots ordered by (expert, slot), the ids at the top of each width included."""
    g = torch.Generator().manual_seed(num_experts)
    ids_TK = torch.randint(0, num_experts, (300, 4), generator=g)
    ids_TK[:3] = num_experts - 1            # the largest id each key width must hold
    ids_TK[3:5] = max(num_experts - 2, 0)
    plan = ops.make_plan(ids_TK, num_experts)
    flat = ids_TK.reshape(-1).tolist()
    want = sorted(range(len(flat)), key=lambda s: (flat[s], s))
    assert plan.slot_of_row_R.tolist() == want
    assert plan.row_of_slot_S[plan.slot_of_row_R].tolist() == list(range(len(flat)))
    assert plan.counts_E.tolist() == [flat.count(e) for e in range(num_experts)]


def test_capacity_drops_in_token_order():
    moe = make(num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[1] = 10.0
    x = torch.rand(12, 16) + 0.1          # every token prefers expert 1; capacity = 3
    x[7] = -x[7]                          # token 7 goes elsewhere
    y, aux = moe(x)
    assert aux.dropped == 12 - 1 - 3
    assert aux.tokens_per_expert.tolist()[1] == 3
    # the first three tokens on expert 1 (0, 1, 2) are kept; later ones produce zero output
    assert (y[:3].abs().sum(-1) > 0).all()
    assert (y[3:7] == 0).all() and (y[8:] == 0).all()
    assert (y[7] != 0).any()


def test_balance_loss_values():
    E, T, K = 4, 8, 2
    uniform = torch.full((T, E), 1 / E, dtype=torch.float64)
    ids = torch.arange(T * K).view(T, K) % E
    assert balance_loss(uniform, ids, 0.01).item() == pytest.approx(0.01, abs=1e-12)
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.55, 0.45] -> coef * 2 * 0.55
    assert balance_loss(probs, ids, 0.1).item() == pytest.approx(0.11, abs=1e-7)


def test_balance_loss_perfectly_balanced_layer():
    # tokens x and -x against router rows w and -w: f = P = [1/2, 1/2] exactly
    moe = make(torch.float64, num_experts=2, top_k=1, balance_loss_coef=0.02)
    with torch.no_grad():
        moe.router.weight[1] = -moe.router.weight[0]
    x = torch.randn(5, 16, dtype=torch.float64)
    _, aux = moe(torch.cat([x, -x]))
    assert aux.tokens_per_expert.tolist() == [5, 5]
    assert aux.balance_loss.item() == pytest.approx(0.02, abs=1e-15)


def test_z_loss_value():
    moe = make(num_experts=8, z_loss_coef=1e-3, balance_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(torch.randn(5, 16))
    assert aux.z_loss.item() == pytest.approx(1e-3 * math.log(8) ** 2, rel=1e-6)
    assert aux.balance_loss.item() == 0.0


def test_bias_selects_but_does_not_weight():
    moe = make(score_func="sigmoid", bias_update_rate=1e-3, norm_topk_prob=False, top_k=1)
    with torch.no_grad():
        moe.router.bias[3] = 100.0
    x = torch.randn(10, 16)
    route = moe.router(x)
    assert (route.expert_ids_TK == 3).all()
    expected = torch.sigmoid(x @ moe.router.weight.T)[:, 3]
    torch.testing.assert_close(route.weights_TK[:, 0], expected)


def test_bias_update_balances_load():
    moe = make(score_func="sigmoid", bias_update_rate=1e-2, num_experts=8, top_k=2)
    with torch.no_grad():
        moe.router.weight[0] += 0.5
        moe.router.weight[1] += 0.3
    x = torch.randn(512, 16)
    first = moe.router(x).expert_ids_TK
    load0 = torch.bincount(first.flatten(), minlength=8).float()
    for _ in range(300):
        ids = moe.router(x).expert_ids_TK
        moe.update_bias(torch.bincount(ids.flatten(), minlength=8))
    load = torch.bincount(moe.router(x).expert_ids_TK.flatten(), minlength=8).float()
    assert load.std() < 0.5 * load0.std()
    assert abs(float(moe.router.bias.mean())) < 1e-6


def test_update_bias_off_raises():
    with pytest.raises(ValueError, match="bias_update_rate"):
        make().update_bias(torch.ones(8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    outs = []
    for _ in range(2):
        moe = make(backend=backend, num_experts=8, top_k=3, seed=3)
        x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, aux = moe(x)
        (y.square().sum() + aux.balance_loss).backward()
        outs.append([y, x.grad] + [p.grad for p in moe.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    moe = make(backend=backend, num_shared_experts=1)
    x = torch.randn(0, 16, requires_grad=True)
    y, aux = moe(x)
    assert y.shape == (0, 16)
    assert aux.balance_loss.item() == 0 and aux.z_loss.item() == 0
    assert aux.tokens_per_expert.tolist() == [0] * 8
    (y.sum() + aux.balance_loss).backward()


def test_nan_propagates():
    moe = make()
    x = torch.randn(6, 16)
    x[2, 3] = float("nan")
    y, aux = moe(x)
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("x, match", [
    (torch.tensor(1.0), "0 dims"),
    (torch.randn(3, 15), "x.shape"),
    (torch.ones(3, 16, dtype=torch.long), "x.dtype"),
])
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k"),
    (dict(dim=0), "dim"),
    (dict(hidden_dim=-4), "hidden_dim"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_groups=3, topk_groups=1), "num_groups"),
    (dict(num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_groups=4, topk_groups=1, top_k=3), "topk_groups"),
    (dict(num_groups=4), "topk_groups"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(score_func="relu"), "score_func"),
    (dict(backend="cuda-magic"), "backend"),
    (dict(balance_loss_coef=-1), "balance_loss_coef"),
])
def test_bad_config(kw, match):
    cfg = dict(dim=16, hidden_dim=32, num_experts=8, top_k=2)
    cfg.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**cfg)


def test_state_dict_layout():
    moe = make(num_shared_experts=1, bias_update_rate=1e-3)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes["router.weight"] == (8, 16)
    assert shapes["router.bias"] == (8,)
    assert shapes["experts.gate_up"] == (8, 16, 64)
    assert shapes["experts.down"] == (8, 32, 16)
    assert any(k.startswith("shared.") for k in shapes)
    assert "router.bias" not in make().state_dict()


def test_shared_expert_starts_like_a_routed_expert():
    """Each weight of the shared SwiGLU has std fan_in^-0.5, as the routed experts' (and the
    dense FFN's, tests/test_moe_vs_dense.py); nn.Linear's default gave (3 fan_in)^-0.5."""
    moe = make(dim=256, hidden_dim=128, num_shared_experts=2)
    for weight, fan_in in ((moe.experts.gate_up, 256), (moe.experts.down, 128),
                           (moe.shared.gate_proj.weight, 256), (moe.shared.up_proj.weight, 256),
                           (moe.shared.down_proj.weight, 256)):
        assert weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.03)


def test_expert_formula_matches_state_dict_contract():
    moe = make(num_experts=1, top_k=1, num_shared_experts=0)
    x = torch.randn(4, 16)
    y, _ = moe(x)
    h = x @ moe.experts.gate_up[0]
    g, u = h.chunk(2, -1)
    torch.testing.assert_close(y, (torch.nn.functional.silu(g) * u) @ moe.experts.down[0])


def saved_activation_bytes(moe, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters and the input,
    which live anyway, excluded); backward runs, so every kept tensor is also used."""
    skip = {t.untyped_storage().data_ptr() for t in [x, *moe.parameters()]}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, aux = moe(x)
    (y.float().square().sum() + aux.balance_loss).backward()
    return sum(kept.values())


# OLMoE's and Qwen3's F/D, E and K at D = 512 (D/4), with fewer tokens
@pytest.mark.parametrize("D,F,E,K", [(512, 256, 64, 8), (512, 192, 128, 8)])
def test_grouped_lowmem_keeps_only_gate_up_activations(D, F, E, K):
    """The dropless low-memory grouped path keeps [g | u] (2*R*F) and indices: not the gathered rows x_RD, the
    expert outputs y_RD (R*D each) or the router's fp32 copy of x (at D = 2048, T = 512:
    before 3.30 / 3.09 R*D, after 1.02 / 0.78)."""
    T = 64
    R = T * K
    moe = make(torch.bfloat16, dim=D, hidden_dim=F, num_experts=E, top_k=K,
               backend="grouped_lowmem")
    x = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_activation_bytes(moe, x)
    gate_up_bytes = 2 * R * F * 2
    # what remains besides [g | u]: router scores [T, E] fp32 and int64 indices [R], less than
    # the fp32 copy of x (T*D*4 = R*D*2/4 here) that the router used to keep
    assert gate_up_bytes <= saved < gate_up_bytes + R * D * 2 // 4, (saved, gate_up_bytes)
