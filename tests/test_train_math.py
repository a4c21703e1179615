"""What a user silently relies on in the training loop's arithmetic: gradient accumulation equals one
big batch (LM loss, z-loss, loads, clipping, the aux-loss-free bias step), the balance loss taken per
micro-batch (pinned), which weights AdamW decays, the LR schedule at its edges, evaluation that
leaves training untouched, and an exact resume with the bias-balanced router."""

import copy
import json
import signal
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dropless.checkpoint import load_run, resume_config
from dropless.config import PRESETS, TrainConfig
from dropless.model import Transformer
from dropless.optim import lr_at, make_optimizer, matmul_weights
from dropless.parallel.runtime import Runtime
from dropless.train import evaluate, lm_loss, train, train_step

RT = Runtime(device=torch.device("cpu"))
FP32 = nullcontext()


def _model_cfg(**moe):
    tiny = PRESETS["tiny"]
    return replace(tiny, vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_embeddings=False,
                   moe=replace(tiny.moe, dim=64, hidden_dim=64, num_experts=4, **moe))


def _build(mcfg, tcfg, working=False):
    torch.manual_seed(0)
    model = Transformer(mcfg)
    return model, make_optimizer(model, tcfg, working_copies=working)


def _tokens(rows=4, seed=0):
    return torch.randint(0, 64, (rows, 33), generator=torch.Generator().manual_seed(seed))


def _split(tokens, micro):
    return [(t[:, :-1], t[:, 1:]) for t in tokens.chunk(micro)]


def _step(model, opt, batches, tcfg, amp=FP32):
    """train_step, also returning the gradients AdamW reads (after clipping), in fp32."""
    seen = []
    real_step = opt.step

    def recording_step():
        seen.append([g.detach().float().clone() for g in opt.gradients()])
        real_step()

    opt.step = recording_step
    try:
        out = train_step(model, lm_loss, opt, batches, amp, tcfg, RT, len(model.moe_layers()),
                         model.cfg.moe.num_experts)
    finally:
        del opt.step
    return out, seen[0]


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- gradient accumulation ----------------------------------------------------------------------

@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("router", ["softmax", "sigmoid_bias"])
def test_grad_accum_equals_one_big_batch(clip, router):
    """grad_accum=2 over batch B == grad_accum=1 over 2B on the same tokens, two steps: the same
    loss, z-loss, loads, grad norm (of the accumulated gradient: the clip binds on it, not on each
    micro-batch's), clipped gradients, weights, and the router bias (updated once per optimizer
    step from the loads summed over micro-batches). Balance loss off: it is per micro-batch (below)."""
    moe = dict(balance_loss_coef=0.0, z_loss_coef=1e-2)
    if router == "sigmoid_bias":
        moe.update(score_func="sigmoid", bias_update_rate=1e-2)
    tcfg = TrainConfig(out="unused", grad_clip=clip, lr=1e-2)
    runs = []
    for micro in (1, 2):
        model, opt = _build(_model_cfg(**moe), tcfg)
        for group in opt.param_groups:
            # eps 1: the update ~ the gradient, not its sign, so gradients of ~1e-9 whose fp32
            # rounding differs do not move weights by lr
            group["eps"] = 1.0
        trace = []
        for seed in (0, 1):
            (lm, aux, norm, loads), grads = _step(model, opt, _split(_tokens(seed=seed), micro), tcfg)
            trace.append((lm, aux, norm, loads, grads, _params(model),
                          [m.router.bias for m in model.moe_layers()]))
        runs.append(trace)
    for one, two in zip(*runs):
        lm1, aux1, norm1, loads1, grads1, params1, bias1 = one
        lm2, aux2, norm2, loads2, grads2, params2, bias2 = two
        torch.testing.assert_close(lm2, lm1, rtol=1e-6, atol=0)
        torch.testing.assert_close(aux2, aux1, rtol=1e-5, atol=0)
        assert aux1 > 0
        assert torch.equal(loads1, loads2)
        torch.testing.assert_close(norm2, norm1, rtol=1e-5, atol=0)
        if clip:
            assert norm1 > 10 * clip   # binds
            torch.testing.assert_close(total(grads1), torch.tensor(clip), rtol=1e-4, atol=0)
        for g1, g2 in zip(grads1, grads2):
            torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(params2, params1, rtol=1e-5, atol=1e-6)
        for b1, b2 in zip(bias1, bias2):
            assert (b1 is None) == (router == "softmax")
            if b1 is not None:
                assert torch.equal(b1, b2)


def total(grads):
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))


def test_bias_steps_once_per_optimizer_step_from_summed_loads():
    """With 2 micro-batches the bias moves once, by rate * sign(mean - load) of the step's summed
    loads, re-centred: the DeepSeek-V3 / torchtitan form (ANCHORS.md), not once per micro-batch."""
    rate = 1e-2
    tcfg = TrainConfig(out="unused", lr=1e-2)
    model, opt = _build(_model_cfg(score_func="sigmoid", bias_update_rate=rate), tcfg)
    (_, _, _, loads_LE), _ = _step(model, opt, _split(_tokens(), 2), tcfg)
    for moe, load in zip(model.moe_layers(), loads_LE.float()):
        delta = rate * torch.sign(load.mean() - load)
        torch.testing.assert_close(moe.router.bias, delta - delta.mean(), rtol=0, atol=1e-9)
        assert moe.router.bias.abs().max() > 0
    assert int(loads_LE.sum()) == len(loads_LE) * 4 * 32 * model.cfg.moe.top_k   # every row


def test_balance_loss_is_per_micro_batch():
    """Pinned choice (as Megatron-Core's default): with micro-batches, the Switch balance loss's f
    and P are taken over each micro-batch and the losses averaged; this differs from the loss over
    the whole step's tokens, so grad_accum changes the balance term's gradient (the LM and z terms,
    per-token means, do not change). Under data parallelism `global_counts` makes f global over
    the ranks' micro-batch, not over the step."""
    tcfg = TrainConfig(out="unused", lr=1e-2)
    model, opt = _build(_model_cfg(balance_loss_coef=0.1, z_loss_coef=0.0), tcfg)
    tokens = _tokens()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        per_micro = torch.stack([ref(x)[1].balance_loss for x, _ in _split(tokens, 2)]).mean()
        whole = ref(_split(tokens, 1)[0][0])[1].balance_loss
    (_, aux, _, _), _ = _step(model, opt, _split(tokens, 2), tcfg)
    torch.testing.assert_close(aux, per_micro, rtol=1e-6, atol=0)
    assert abs(per_micro - whole) > 1e-5 * whole   # the two definitions do differ here


def test_grad_accum_under_bf16_mixed_working_copies():
    """bf16-mixed (MasterAdamW's bf16 working copies, gradients summed over micro-batches in fp32):
    grad_accum=2 over B matches one batch of 2B to bf16 tolerance (the bf16 products of the two
    shapes round differently), and the copies stay bf16 of the fp32 masters."""
    tcfg = TrainConfig(out="unused", lr=1e-2, grad_clip=0.05)
    amp = torch.autocast("cpu", torch.bfloat16)
    runs = []
    for micro in (1, 2):
        model, opt = _build(_model_cfg(), tcfg, working=True)
        (lm, _, norm, _), grads = _step(model, opt, _split(_tokens(), micro), tcfg, amp)
        runs.append((lm, norm, torch.cat([g.flatten() for g in grads])))
        assert all(w.dtype == torch.bfloat16 and torch.equal(w, opt.masters[n].to(torch.bfloat16))
                   for n, w in opt.working.items())
    (lm1, norm1, g1), (lm2, norm2, g2) = runs
    torch.testing.assert_close(lm2, lm1, rtol=1e-2, atol=0)
    torch.testing.assert_close(norm2, norm1, rtol=1e-2, atol=0)
    assert (g2 - g1).norm() / g1.norm() < 1e-2


# ---- weight decay -------------------------------------------------------------------------------

@pytest.mark.parametrize("working", [False, True])
def test_weight_decay_applies_to_matrices_only(working):
    """A step on zero gradients is decay alone (Adam's moments stay 0): every matrix that is not
    an embedding shrinks by lr * wd (the router's weight and the experts' too, as the docstring
    says), embeddings, norm gains and biases do not move; through bf16-mixed's working copies too."""
    mcfg = replace(_model_cfg(num_shared_experts=1, shared_gate=True), attention_bias=True)
    tcfg = TrainConfig(out="unused", lr=0.5, weight_decay=0.2)
    model, opt = _build(mcfg, tcfg, working)
    assert bool(opt.masters) is working
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for w in opt.working_params().values():
        w.grad = torch.zeros_like(w)
    for p in model.parameters():
        if id(p) not in {id(m) for m in opt.masters.values()}:
            p.grad = torch.zeros_like(p)
    opt.step()
    decayed = set()
    for n, p in model.named_parameters():
        if torch.equal(p, before[n]):
            continue
        torch.testing.assert_close(p, before[n] * (1 - 0.5 * 0.2), rtol=1e-6, atol=0, msg=n)
        decayed.add(n)
    want = {n for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight"}
    assert decayed == want
    assert {"layers.0.ffn.router.weight", "lm_head.weight", "layers.0.ffn.shared_gate.weight",
            "layers.0.ffn.experts.down"} <= decayed
    assert not any("norm" in n or n.endswith(".bias") for n in decayed)
    if working:
        assert set(matmul_weights(model)) <= decayed


# ---- the learning-rate schedule ------------------------------------------------------------------

@pytest.mark.parametrize("warmup, steps", [(0, 1), (0, 2), (0, 7), (1, 1), (3, 3), (5, 3), (3, 10),
                                           (9, 10), (100, 900)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_lr_schedule_edges(warmup, steps, ratio):
    """Over the steps a run takes (0 .. steps-1): positive unless min_lr_ratio is 0, never above lr,
    a linear ramp through warmup that reaches lr at its last step, then non-increasing; ratio 1 is
    constant after warmup. Pinned: the cosine reaches lr*min_lr_ratio at step == steps, one past
    the last step taken (whose lr exceeds it by at most (lr - min) * pi^2 / (4 n^2), n the decay
    steps): no division by zero at warmup 0, warmup >= steps, or steps 1."""
    cfg = TrainConfig(out="x", lr=2.0, warmup=warmup, steps=steps, min_lr_ratio=ratio)
    lrs = [lr_at(s, cfg) for s in range(steps)]
    assert all(0 < lr <= 2.0 for lr in lrs)
    assert lrs[:warmup] == [2.0 * (s + 1) / warmup for s in range(min(warmup, steps))]
    decay = lrs[warmup:]
    if decay:
        assert decay[0] == 2.0   # the first step after warmup is at the peak
        assert all(a >= b for a, b in zip(decay, decay[1:]))
        if ratio == 1.0:
            assert all(lr == 2.0 for lr in decay)
        n = steps - warmup
        assert decay[-1] - 2.0 * ratio <= 2.0 * (1 - ratio) * 2.5 / n ** 2 + 1e-12
        assert lr_at(steps, cfg) == pytest.approx(2.0 * ratio, abs=1e-12)


# ---- evaluation and resume, through train() -------------------------------------------------------

def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_eval_does_not_touch_training(small_cfg, tmp_path):
    """eval_every=1 and eval only at the end train bitwise the same weights and losses (evaluation
    changes neither the model, nor the bias, nor the RNG stream, and restores train mode); the
    reported val loss is the loaded model's mean loss over the validation windows, and evaluating
    again gives the same number."""
    from dropless import data

    runs = []
    for every in (1, 100):
        cfg = small_cfg(out=str(tmp_path / f"e{every}"), steps=4, eval_every=every, grad_accum=2,
                        sample_tokens=0)
        summary = train(cfg, progress=False)
        runs.append((cfg, summary, load_run(summary["run_dir"])[0], _metrics(summary["run_dir"])))
    (cfg, sa, model_a, ma), (_, sb, model_b, mb) = runs
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert sum("val_loss" in r for r in ma) == 4 and sum("val_loss" in r for r in mb) == 1
    assert sa["val_loss"] == sb["val_loss"] == ma[-1]["val_loss"]

    _, tok, state = load_run(sa["run_dir"])
    tokens = data.load_tokens(data.read_documents(cfg.data), tok, Path(cfg.cache_dir))
    windows = data.eval_batches(tokens.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    model_a.train()
    rng = torch.get_rng_state()
    again = [evaluate(model_a, windows, torch.device("cpu"), FP32) for _ in range(2)]
    assert again[0] == again[1] == pytest.approx(sa["val_loss"], rel=1e-6)
    assert model_a.training and torch.equal(rng, torch.get_rng_state())


def test_resume_with_bias_router_and_grad_accum(small_cfg, tmp_path, monkeypatch):
    """4 steps straight == 2 steps, Ctrl-C, resume for 2 with a sigmoid router whose bias is
    balanced without a loss (a buffer, saved and restored) and grad_accum 2: bitwise equal."""
    tiny = PRESETS["tiny"]
    monkeypatch.setitem(PRESETS, "tiny", replace(tiny, moe=replace(
        tiny.moe, score_func="sigmoid", bias_update_rate=1e-2)))
    straight = small_cfg(out=str(tmp_path / "straight"), steps=4, grad_accum=2, eval_every=2,
                         sample_tokens=0)
    train(straight, progress=False)

    def ctrl_c_at_2(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    split = replace(straight, out=str(tmp_path / "split"))
    assert train(split, progress=False, on_step=ctrl_c_at_2)["step"] == 2
    cfg, state = resume_config(tmp_path / "split", {})
    assert train(cfg, state=state, progress=False)["finished"]
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [(r["loss"], r["grad_norm"], r["expert_load"]) for r in a] == \
        [(r["loss"], r["grad_norm"], r["expert_load"]) for r in b]
    model_a, model_b = load_run(tmp_path / "straight")[0], load_run(tmp_path / "split")[0]
    biases = [m.router.bias for m in model_a.moe_layers()]
    assert all(b is not None and b.abs().max() > 0 for b in biases)
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name
