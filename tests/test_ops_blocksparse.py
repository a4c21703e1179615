"""Block-sparse topology and custom op; the combine, dispatch and SwiGLU kernels that the default
path uses on CUDA, against their PyTorch references. (The block-sparse experts' outputs and gradients
against float64, determinism and the whole layer are in test_ops_triton.py, with the fused backend.)

Runs on a GPU when there is one, else on the CPU under the Triton interpreter (fp32/fp16 only: the
interpreter's bf16 arithmetic is wrong), at small shapes with blocks of 64 rows (128 on the GPU).
"""

import pytest
import torch

from test_ops_triton import DEVICE, DTYPES, TOL, rel, routing   # first: it sets up Triton

from dropless import ops
from dropless.ops import reference, triton_blocksparse

BLOCK = 128 if DEVICE == "cuda" else 64

# outputs and all gradients against float64, determinism and the whole layer (router gradient
# included): parametrized over both fused backends in test_ops_triton.py


def test_topology_pads_each_expert_to_whole_blocks():
    counts = torch.tensor([3, 0, 5, 1])
    row_expert, block_start, num_blocks, pad_row = triton_blocksparse.topology(counts, 9, block=4)
    assert row_expert.tolist() == [0, 2, 2, 3, -1, -1, -1]   # cdiv(9, 4) + 4 = 7 blocks, 4 used
    assert block_start.tolist() == [0, 1, 1, 3] and num_blocks.tolist() == [1, 0, 2, 1]
    assert pad_row.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]


def test_custom_op_registrations():
    """Schema, fake (meta) implementation and autograd registration, as torch.compile needs them."""
    counts = torch.tensor([30, 0, 50, 20], device=DEVICE)
    row_expert, block_start, num_blocks, _ = triton_blocksparse.topology(counts, 100, BLOCK)
    P = row_expert.numel() * BLOCK
    args = [torch.randn(P, 64, device=DEVICE, requires_grad=True), row_expert, block_start,
            num_blocks, torch.randn(4, 64, 128, device=DEVICE, requires_grad=True),
            torch.randn(4, 64, 64, device=DEVICE, requires_grad=True), BLOCK]
    torch.library.opcheck(torch.ops.dropless.blocksparse_swiglu.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.parametrize("T,K,capacity", [(50, 2, None), (37, 1, None), (40, 4, 6)])
def test_triton_combine_matches_reference(T, K, capacity):
    """The Triton combine (the CUDA path of ops.combine) against reference.combine in float64."""
    from dropless.ops import triton_combine
    E, D = 4, 80
    gen = torch.Generator().manual_seed(T + K)
    weights, ids = routing(T, E, K, "random", gen)
    plan = ops.make_plan(ids, E, capacity)
    y_RD = torch.randn(plan.slot_of_row_R.numel(), D, generator=gen)
    dy = torch.randn(T, D, generator=gen)
    refs = [t.double().requires_grad_() for t in (y_RD, weights)]
    out_ref = reference.combine(refs[0], plan, refs[1])
    grads_ref = torch.autograd.grad(out_ref, refs, dy.double())
    ins = [t.to(DEVICE).requires_grad_() for t in (y_RD, weights)]
    dev_plan = ops.make_plan(ids.to(DEVICE), E, capacity)
    out = triton_combine.combine(ins[0], dev_plan, ins[1])
    grads = torch.autograd.grad(out, ins, dy.to(DEVICE))
    for name, a, b in zip(["y", "dy_rows", "dweights"], (out, *grads), (out_ref, *grads_ref)):
        assert rel(a.detach().cpu(), b) < 1e-5, name


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_swiglu_matches_torch(dtype):
    """The fused SwiGLU passes (used by the block-sparse experts, and by the grouped ones on CUDA)
    against PyTorch's ops: forward h, recomputed h and d[g | u]."""
    from dropless.ops import triton_swiglu
    gen = torch.Generator().manual_seed(3)
    gu = torch.randn(37, 2 * 48, generator=gen).to(DEVICE, dtype)
    dh = torch.randn(37, 48, generator=gen).to(DEVICE, dtype)
    gu_ref = gu.double().requires_grad_()
    g, u = gu_ref.chunk(2, dim=-1)
    h_ref = torch.nn.functional.silu(g) * u
    (dgu_ref,) = torch.autograd.grad(h_ref, gu_ref, dh.double())
    h, (h2, dgu) = triton_swiglu.swiglu(gu), triton_swiglu.swiglu_backward(gu, dh)
    assert torch.equal(h, h2)
    assert torch.equal(dgu, triton_swiglu.swiglu_backward(gu, dh, want_h=False))
    assert rel(h, h_ref.detach()) < TOL[dtype]
    assert rel(dgu, dgu_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [48, 300])   # one column block; several with a ragged last one
def test_triton_swiglu_weighted_matches_torch(dtype, N):
    """The routing weight folded into the SwiGLU passes (grouped_lowmem on CUDA): w * h forward;
    backward w * h again, dw = <dh', h> per row and dh = w * dh' in place, against float64."""
    from dropless.ops import triton_swiglu
    gen = torch.Generator().manual_seed(N)
    R = 37
    gu = torch.randn(R, 2 * N, generator=gen).to(DEVICE, dtype)
    dhw = torch.randn(R, N, generator=gen).to(DEVICE, dtype)
    w = torch.rand(R, generator=gen).to(DEVICE, dtype)
    g, u = gu.double().chunk(2, dim=-1)
    h_ref = torch.nn.functional.silu(g) * u
    w_ref = w.double().unsqueeze(-1)
    hw = triton_swiglu.swiglu(gu, w)
    dh = dhw.clone()
    hw2, dw = triton_swiglu.swiglu_weighted_backward(gu, dh, w)
    assert torch.equal(hw, hw2)
    assert rel(hw, h_ref * w_ref) < TOL[dtype]
    assert rel(dw, (dhw.double() * h_ref).sum(-1)) < TOL[dtype]
    assert rel(dh, dhw.double() * w_ref) < TOL[dtype]
    assert dw.dtype == w.dtype and dw.shape == (R,)
    # the one-pass form (grouped_lowmem's backward): w * h written over dh' (the same bits), dw
    # (its fp32 sum may run in another order: not bitwise on a GPU) and d[g | u] from that dh
    over = dhw.clone()
    hw3, dw3, dgu = triton_swiglu.swiglu_weighted_backward(gu, over, w, want_dgu=True)
    assert hw3.data_ptr() == over.data_ptr() and torch.equal(hw3, hw2)
    assert rel(dw3, (dhw.double() * h_ref).sum(-1)) < TOL[dtype]
    assert rel(dgu, triton_swiglu.swiglu_backward(gu, dh, want_h=False)) < TOL[dtype] / 10
    gu64 = gu.double().requires_grad_()
    g64, u64 = gu64.chunk(2, dim=-1)
    (dgu_ref,) = torch.autograd.grad(torch.nn.functional.silu(g64) * u64, gu64, dh.double())
    assert rel(dgu, dgu_ref) < TOL[dtype]


@pytest.mark.parametrize("K,capacity", [(2, None), (4, 6)])
def test_triton_dispatch_matches_reference(K, capacity):
    """The CUDA dispatch (gather; backward K-sum by the combine kernel) against reference.dispatch."""
    from dropless.ops import triton_combine
    T, E, D = 40, 4, 80
    gen = torch.Generator().manual_seed(K)
    _, ids = routing(T, E, K, "random", gen)
    x = torch.randn(T, D, generator=gen)
    plan = ops.make_plan(ids, E, capacity)
    x_ref = x.double().requires_grad_()
    out_ref = reference.dispatch(x_ref, plan)
    dy = torch.randn(out_ref.shape, generator=gen)
    (grad_ref,) = torch.autograd.grad(out_ref, x_ref, dy.double())
    x_dev = x.to(DEVICE).requires_grad_()
    out = triton_combine.dispatch(x_dev, ops.make_plan(ids.to(DEVICE), E, capacity))
    (grad,) = torch.autograd.grad(out, x_dev, dy.to(DEVICE))
    assert torch.equal(out.detach().cpu().double(), out_ref.detach())
    assert rel(grad.cpu(), grad_ref) < 1e-6
