"""bf16-mixed's working copies (dropless.optim.MasterAdamW): the same training as bf16 autocast over
fp32 weights with torch's AdamW, and the Triton AdamW kernel against its PyTorch formula."""

from dataclasses import replace

import pytest
import torch

from triton_env import DEVICE   # first: it sets up Triton

from dropless.config import PRESETS, TrainConfig
from dropless.model import Transformer
from dropless.ops import triton_adamw
from dropless.optim import make_optimizer, matmul_weights
from dropless.parallel.runtime import Runtime
from dropless.train import lm_loss, train_step


def test_matmul_weights_are_the_linear_and_expert_weights_only():
    model = Transformer(replace(PRESETS["tiny"], tie_embeddings=True))
    names = set(matmul_weights(model))
    assert "layers.0.ffn.experts.gate_up" in names and "layers.0.attn.q_proj.weight" in names
    assert not any("router" in n or "norm" in n or "embed" in n for n in names)
    assert "lm_head.weight" not in names   # tied to the embedding, whose lookup reads fp32
    untied = set(matmul_weights(Transformer(replace(PRESETS["tiny"], tie_embeddings=False))))
    assert untied == names | {"lm_head.weight"}


def _tiny(working: bool, tcfg: TrainConfig):
    torch.manual_seed(0)
    model = Transformer(replace(PRESETS["tiny"], vocab_size=64, tie_embeddings=False))
    return model, make_optimizer(model, tcfg, working_copies=working)


def test_working_copies_give_autocasts_gradients():
    """A forward and backward under bf16 autocast through the bf16 working copies gives the same
    loss and, bit for bit, the same gradients as autocast's own casts of the fp32 weights."""
    tcfg = TrainConfig(out="unused", preset="tiny")
    x, y = torch.randint(0, 64, (2, 4, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for working in (False, True):
        model, opt = _tiny(working, tcfg)
        with torch.autocast("cpu", torch.bfloat16):
            loss, aux = lm_loss(model, x, y, opt.working_params())
        (loss + aux.balance_loss + aux.z_loss).backward()
        grads.append((loss.detach(), {n: (opt.working[n] if n in opt.working else p).grad
                                      for n, p in model.named_parameters()}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.equal(loss_a, loss_b)
    assert set(opt.working) == set(matmul_weights(model)) and opt.working
    for name in a:
        want_dtype = torch.bfloat16 if name in opt.working else torch.float32
        assert b[name].dtype == want_dtype and a[name].dtype == torch.float32, name
        assert torch.equal(b[name].float(), a[name]), name


@pytest.mark.parametrize("clip, micro", [(0.05, 1), (0.0, 1), (0.05, 2)])
def test_working_copies_train_as_autocast_over_fp32_weights(clip, micro):
    """train_step under bf16 autocast: torch's AdamW over fp32 weights against MasterAdamW's bf16
    working copies, clipping binding or off, one micro-batch or two (gradients summed in fp32,
    as autocast's are). The first step is the same to fp32 rounding (grad
    norm, every fp32 weight); later steps drift only as far as bf16 roundings of weights that
    differ in their last fp32 bit can take them. The copies stay bf16 of the masters, and the
    optimizer state has AdamW's layout (checkpoints load into either)."""
    tcfg = TrainConfig(out="unused", preset="tiny", grad_clip=clip, lr=1e-2)
    tokens = torch.randint(0, 64, (4, 4, 33), generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cpu", torch.bfloat16)
    rt = Runtime(device=torch.device("cpu"))
    runs = []
    for working in (False, True):
        model, opt = _tiny(working, tcfg)
        assert bool(opt.masters) is working
        L, E = len(model.moe_layers()), model.cfg.moe.num_experts
        trace, first = [], None
        for t in tokens:
            batches = [(b[:, :-1], b[:, 1:]) for b in t.chunk(micro)]
            trace.append(torch.stack(train_step(model, lm_loss, opt, batches, amp, tcfg, rt, L,
                                                E)[::2]))
            first = first if first is not None else [p.detach().clone() for p in model.parameters()]
        runs.append((model, opt, torch.stack(trace), first))
    (_, ref_opt, ref_trace, ref_first), (model, opt, trace, first) = runs
    torch.testing.assert_close(trace[0], ref_trace[0], rtol=1e-6, atol=0)
    for (name, _), p, q in zip(model.named_parameters(), first, ref_first):
        assert p.dtype == torch.float32, name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(trace, ref_trace, rtol=2e-2, atol=0)
    if clip:
        assert (trace[:, 1] > 10 * clip).all()   # the clip binds
    assert not opt.sums
    for name, w in opt.working.items():
        assert w.dtype == torch.bfloat16 and w.grad is None
        assert torch.equal(w, opt.masters[name].detach().to(torch.bfloat16)), name
    state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for i in state:
        assert state[i].keys() == ref_state[i].keys() and float(state[i]["step"]) == 4.0


@pytest.mark.parametrize("scaled, summed", [(False, False), (True, False), (True, True)])
def test_triton_adamw_kernel_matches_its_formula(scaled, summed):
    """The kernel against `step_reference` over three steps (on the GPU with a bf16 copy; under the
    CPU interpreter, whose bf16 arithmetic is wrong, with an fp16 copy), at a size that is not a
    multiple of the block; gradients in the copy's dtype, or fp32 (`summed` micro-batches)."""
    gen = torch.Generator().manual_seed(0)
    n = triton_adamw.BLOCK * 2 + 77
    copy_dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    p0 = torch.randn(n, generator=gen)
    runs = []
    for fn in (triton_adamw.launch, triton_adamw.step_reference):
        p, m, v = p0.clone().to(DEVICE), torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
        w = p.to(copy_dtype)
        count = torch.zeros((), device=DEVICE)
        for i in range(3):
            g = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(
                DEVICE, torch.float32 if summed else copy_dtype)
            count += 1
            scale = torch.tensor(2.5, device=DEVICE) if scaled else None
            fn(p, g, m, v, w, count, scale, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95),
               eps=1e-8)
        runs.append((p, m, v, w))
    for got, want in zip(runs[0][:3], runs[1][:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, _, _, w in runs:   # the copy is the master rounded (1 ulp apart where the masters are)
        assert torch.equal(w, p.to(copy_dtype))
    assert not torch.equal(runs[0][0], p0.to(DEVICE))


def test_reference_formula_is_torch_adamw():
    """`step_reference` is torch.optim.AdamW's step (fp32 gradients, no scale)."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(300, generator=gen)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    p, m, v, w, count = p0.clone(), torch.zeros(300), torch.zeros(300), p0.clone(), torch.zeros(())
    for _ in range(4):
        g = torch.randn(300, generator=gen)
        ref.grad = g.clone()
        opt.step()
        count += 1
        triton_adamw.step_reference(p, g, m, v, w, count, None, lr=1e-2, weight_decay=0.1,
                                    betas=(0.9, 0.95), eps=1e-8)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w, p)
