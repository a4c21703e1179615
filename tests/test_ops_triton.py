"""The fused grouped Triton experts against the float64 reference: outputs and all gradients.

Runs on a GPU when there is one, else on the CPU under the Triton interpreter (fp32/fp16 only: the
interpreter's bf16 arithmetic is wrong), at small shapes with the kernels' large interpreter blocks.
"""

import functools

import pytest
import torch

from triton_env import DEVICE, DTYPES, TOL   # first: it sets up Triton

from dropless import MoE, MoEConfig, ops
from dropless.ops import grouped, reference, triton_blocksparse, triton_grouped



def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def poison_allocator():
    """Fill the allocator's cached blocks with NaN so that unwritten outputs cannot pass."""
    if DEVICE == "cuda":
        torch.empty(1 << 28, device=DEVICE).fill_(float("nan"))


def routing(T, E, K, mode, gen):
    """Random top-k routing, or skewed: 'one' sends every token to expert 0 (K == 1) or to experts
    0..K-1; 'few' uses only the first half of the experts (the rest get zero tokens)."""
    logits = torch.randn(T, E, generator=gen)
    if mode == "one":
        logits[:, :K] += 100
    elif mode == "few":
        logits[:, E // 2:] -= 100
    weights, ids = logits.softmax(-1).topk(K, dim=-1)
    return weights, ids


CASES = [  # T, D, F, E, K, routing
    (100, 64, 96, 4, 2, "random"),     # T*K not a multiple of the 128-row tile
    (37, 64, 64, 1, 1, "random"),      # a single expert
    (50, 64, 64, 4, 4, "random"),      # K == E
    (64, 64, 64, 8, 2, "few"),         # experts with zero tokens
    (70, 64, 64, 4, 1, "one"),         # every token on one expert
]


# the fused backends; the block-sparse one with 64-row blocks in the (slow) CPU interpreter;
# "grouped_lowmem" (grouped_mm: bf16 only on CUDA) with its Triton elementwise and K-sum kernels, which
# the `triton_kernels_on_cpu` fixture switches on for CPU tensors
FUSED = {"triton": triton_grouped.fused_experts,
         "blocksparse": functools.partial(triton_blocksparse.blocksparse_experts,
                                          block=128 if DEVICE == "cuda" else 64),
         "grouped_lowmem": grouped.fused_experts}
# every case in every dtype; on the CPU the block-sparse backend runs fp16 for the first case only
FUSED_CASES = [(backend, dtype, case) for backend in FUSED for case in CASES for dtype in DTYPES
               if (backend == "grouped_lowmem" and (DEVICE == "cpu" or dtype == torch.bfloat16))
               or backend == "triton" or (backend == "blocksparse" and (
                   DEVICE == "cuda" or dtype == torch.float32 or case is CASES[0]))]


@pytest.fixture(autouse=True)
def triton_kernels_on_cpu(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(grouped, "_fused_elementwise", lambda t: True)


@pytest.mark.parametrize("backend,dtype,case", FUSED_CASES)
def test_fused_experts_matches_reference(backend, dtype, case):
    T, D, F, E, K, mode = case
    gen = torch.Generator().manual_seed(T * 131 + E)
    weights, ids = routing(T, E, K, mode, gen)
    x = torch.randn(T, D, generator=gen)
    gate_up = torch.randn(E, D, 2 * F, generator=gen) * D ** -0.5
    down = torch.randn(E, F, D, generator=gen) * F ** -0.5
    dy = torch.randn(T, D, generator=gen)
    refs = [t.double().requires_grad_() for t in (x, weights, gate_up, down)]
    y_ref = reference.moe_loop(refs[0], refs[1], ids, refs[2], refs[3])
    grads_ref = torch.autograd.grad(y_ref, refs, dy.double())

    ins = [t.to(DEVICE, dtype).requires_grad_() for t in (x, gate_up, down)]
    w = weights.to(DEVICE).requires_grad_()
    plan = ops.make_plan(ids.to(DEVICE), E)
    poison_allocator()
    y = FUSED[backend](ins[0], plan, w, ins[1], ins[2])
    poison_allocator()
    grads = torch.autograd.grad(y, (ins[0], w, ins[1], ins[2]), dy.to(DEVICE, dtype))
    assert y.dtype == dtype
    for name, out, ref in zip(["y", "dx", "dweights", "dgate_up", "ddown"],
                              (y, *grads), (y_ref, *grads_ref)):
        err = rel(out.cpu(), ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"   # NaN fails this too


@pytest.mark.parametrize("backend", FUSED)
def test_fused_experts_is_deterministic(backend):
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if backend == "grouped_lowmem" and DEVICE == "cuda" else torch.float32
    weights, ids = routing(100, 4, 2, "random", gen)
    x = torch.randn(100, 64, generator=gen, device="cpu").to(DEVICE, dtype).requires_grad_()
    gate_up = torch.randn(4, 64, 128, generator=gen).to(DEVICE, dtype).requires_grad_()
    down = torch.randn(4, 64, 64, generator=gen).to(DEVICE, dtype).requires_grad_()
    plan = ops.make_plan(ids.to(DEVICE), 4)
    runs = []
    for _ in range(2):
        y = FUSED[backend](x, plan, weights.to(DEVICE), gate_up, down)
        runs.append((y, *torch.autograd.grad(y.square().sum(), (x, gate_up, down))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "blocksparse"])   # fp32: grouped is bf16 on CUDA
def test_layer_triton_matches_float64_reference(backend):
    """The whole layer, router included: gradients reach router.weight through the fused op."""
    torch.manual_seed(0)
    cfg = MoEConfig(dim=64, hidden_dim=64, num_experts=4, top_k=2, backend=backend)
    moe = MoE(cfg).to(DEVICE)
    ref = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=4, top_k=2, backend="reference"))
    ref.load_state_dict({k: v.double().cpu() for k, v in moe.state_dict().items()})
    ref = ref.double()
    assert moe.experts.fuses_dispatch(torch.empty(1, 64, device=DEVICE))
    x = torch.randn(3, 40, 64)
    x_dev = x.clone().to(DEVICE).requires_grad_()
    x_ref = x.double().requires_grad_()
    y, aux = moe(x_dev)
    y_ref, aux_ref = ref(x_ref)
    (y.square().sum() + aux.balance_loss).backward()
    (y_ref.square().sum() + aux_ref.balance_loss).backward()
    assert rel(y.detach().cpu(), y_ref.detach()) < 1e-5
    assert rel(x_dev.grad.cpu(), x_ref.grad) < 1e-5
    for (name, p), p_ref in zip(moe.named_parameters(), ref.parameters()):
        assert rel(p.grad.cpu(), p_ref.grad) < 1e-5, name
    assert torch.equal(aux.tokens_per_expert.cpu(), aux_ref.tokens_per_expert)


def test_custom_op_registrations():
    """Schema, fake (meta) implementation and autograd registration, as torch.compile needs them."""
    gen = torch.Generator().manual_seed(1)
    weights, ids = routing(40, 4, 2, "random", gen)
    plan = ops.make_plan(ids, 4)
    args = (torch.randn(40, 64, requires_grad=True), weights.requires_grad_(),
            plan.slot_of_row_R, plan.counts_E,
            torch.randn(4, 64, 128, requires_grad=True), torch.randn(4, 64, 64, requires_grad=True))
    args = [a.to(DEVICE) if a.is_leaf and not a.requires_grad else a for a in args]
    torch.library.opcheck(torch.ops.dropless.fused_experts.default, [a.to(DEVICE) for a in args],
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
