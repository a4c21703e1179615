"""AWQ: the searches, the quantized modules on the CPU reference path, quantize_model on a model,
and `dropless quantize` -> `eval` / `generate` on a tiny trained run."""

import copy
import dataclasses
import json
import math
import shutil

import pytest
import torch

from dropless import MoE, MoEConfig, PRESETS, Transformer, from_hf
from dropless.checkpoint import load_run
from dropless.cli import main
from dropless.quant import awq
from dropless.quant.calibrate import quantize_model
from dropless.quant.modules import QuantConfig, QuantizedExperts, QuantizedLinear
from dropless.quant.pack import fake_quantize
from tests.conftest import rel_err


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """The CPU reference path, even when a kernel test switched the interpreter on earlier."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def outlier_activations(N, I, gen):
    x = torch.randn(N, I, generator=gen)
    x[:, :4] *= 30.0   # a few salient channels, as in LLM activations
    return x


def test_scale_search_beats_round_to_nearest():
    gen = torch.Generator().manual_seed(0)
    x, w = outlier_activations(512, 256, gen), torch.randn(256, 64, generator=gen)
    s, best, plain = awq.search_scale(awq.act_stat(x), [(x, w)], 128)
    # alpha = 0 is plain rounding: the search reports it and must do clearly better here
    rtn = (x @ fake_quantize(w, 128) - x @ w).pow(2).mean().item()
    assert plain == pytest.approx(rtn, rel=1e-4)
    assert best < 0.7 * plain
    assert s[:4].min() > s[4:].max()   # the salient channels are the ones scaled up


def test_clip_search_never_worse_than_no_clip():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 128, generator=gen), torch.randn(128, 48, generator=gen)
    w[5, 7] = 12.0   # one outlier weight widens its group's range
    max_abs = awq.search_clip(x, w, 64)
    assert max_abs.shape == (2, 48)
    err = lambda m: (x @ fake_quantize(w, 64, m) - x @ w).pow(2).mean().item()  # noqa: E731
    assert err(max_abs) <= err(None) + 1e-9
    assert max_abs[0, 7] < 12.0   # the outlier's group is clipped


def test_quantized_linear_matches_dequantized():
    lin = torch.nn.Linear(128, 64, bias=True)
    q = QuantizedLinear.from_linear(lin, 64)
    x = torch.randn(3, 5, 128)
    w = q.weight.dequantize()
    assert torch.allclose(q(x), x @ w + lin.bias, atol=1e-5)
    assert rel_err(q(x), lin(x)) < 0.1   # and it is a 4-bit copy of the original


def test_quantized_experts_in_moe():
    """An MoE holding QuantizedExperts == the float MoE holding the dequantized weights, on the
    forward (dispatched rows), the fused and the decode paths."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(dim=64, hidden_dim=64, num_experts=8, top_k=2))
    q = QuantizedExperts(8, 64, 64, 32)
    q.gate_up.set_from(moe.experts.gate_up.detach())
    q.down.set_from(moe.experts.down.detach())
    ref = copy.deepcopy(moe)
    ref.experts.gate_up.data = q.gate_up.dequantize()
    ref.experts.down.data = q.down.dequantize()
    moe.experts = q
    x = torch.randn(2, 7, 64)
    y, aux = moe(x)
    y_ref, aux_ref = ref(x)
    assert rel_err(y, y_ref) < 1e-5 and torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert)
    x_TD = x.view(-1, 64)
    route = moe.router(x_TD)
    assert rel_err(q.decode(x_TD, route.expert_ids_TK, route.weights_TK), y_ref.view(-1, 64)) < 1e-5
    plan = moe.dispatcher.plan(route.expert_ids_TK)
    assert rel_err(q.fused(x_TD, plan, route.weights_TK), y_ref.view(-1, 64)) < 1e-5


def tiny_model(**moe_kw):
    cfg = PRESETS["tiny"]
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe_kw))
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_expert_without_tokens_warns_and_rounds():
    # sigmoid routing with a selection bias: expert 5 is never chosen during calibration
    model = tiny_model(score_func="sigmoid", bias_update_rate=1e-3)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.bias[5] = -1e4
    with pytest.warns(UserWarning, match=r"layers\.0\.ffn\.experts\[5\] received no calibration"):
        q = quantize_model(model, torch.randint(0, 256, (4, 16)), QuantConfig(group_size=64),
                           progress=False)
    # the expert is still quantized (round to nearest of its float weights)
    assert q.layers[0].ffn.experts.gate_up.qweight[5].any()


def test_engine_short_prefill_through_int4_experts(monkeypatch):
    """int4 experts decode per slot: the engine takes prompt chunks through the decode step's
    path only while slots <= experts (tiny: 8 experts, top-2, so 4 tokens); both prefill paths
    give the same tokens, with int4 attention projections too."""
    from dropless.serve import Engine, Request, SamplingParams, prefill as prefill_module

    q = quantize_model(tiny_model(), torch.randint(0, 256, (4, 32)), QuantConfig(group_size=64),
                       progress=False)
    blocks = prefill_module.decode_blocks
    short_chunks = []   # tokens of the chunks that took the decode step's path
    monkeypatch.setattr(prefill_module, "decode_blocks", lambda model, x, caches, step, *a: (
        short_chunks.append(step.tokens) if step.tokens > 1 else None,
        blocks(model, x, caches, step, *a))[1])
    outputs = []
    for step_tokens in (128, 0):
        engine = Engine(q, max_batch=2, max_len=40, prefill_step_tokens=step_tokens)
        assert engine.step_tokens == (4 if step_tokens else 0)
        requests = []
        for prompt in ([3, 1, 4], [1, 5, 9, 2, 6, 5, 3]):   # a short chunk, then a long one
            requests.append(engine.submit(Request(prompt, SamplingParams(max_tokens=5,
                                                                         temperature=0))))
            engine.step()
        engine.run_until_done()
        outputs.append([r.output for r in requests])
    assert outputs[0] == outputs[1] and short_chunks == [3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A tiny run trained briefly: enough structure that quantization error shows in the loss."""
    from dropless.config import TrainConfig
    from dropless.train import train

    root = tmp_path_factory.mktemp("awq")
    cfg = TrainConfig(out=str(root / "run"), data=str(corpus), cache_dir=str(root / "cache"),
                      steps=40, batch_size=8, seq_len=32, warmup=10, eval_every=40,
                      eval_batches=2, ckpt_every=100, log_every=10, sample_tokens=0)
    train(cfg, progress=False)
    return root


def test_eval_and_quantize_never_write_to_the_runs_saved_cache(tmp_path, corpus, capsys):
    """A run directory may come from a stranger: its state.json names a cache_dir, and eval and
    quantize must not write there (they use --cache-dir, default ~/.cache/dropless/tokens)."""
    from dropless.config import TrainConfig
    from dropless.train import train

    stranger, mine = tmp_path / "stranger", tmp_path / "mine"
    train(TrainConfig(out=str(tmp_path / "run"), data=str(corpus), cache_dir=str(stranger),
                      steps=2, batch_size=2, seq_len=16, warmup=1, eval_every=2, eval_batches=1,
                      ckpt_every=100, log_every=1, sample_tokens=0), progress=False)
    assert any(stranger.iterdir())
    shutil.rmtree(stranger)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json", "--device", "cpu", "--cache-dir",
                 str(mine)]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["val_loss"])
    assert not stranger.exists() and any(mine.iterdir())
    shutil.rmtree(mine)
    assert main(["quantize", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--group-size",
                 "32", "--calib-data", str(corpus), "--calib-samples", "2", "--calib-seq-len",
                 "16", "--quiet", "--device", "cpu", "--cache-dir", str(mine)]) == 0
    assert not stranger.exists() and any(mine.iterdir())


def test_quantize_then_eval(trained, corpus, capsys):
    run, out = trained / "run", trained / "q"
    assert main(["quantize", str(run), "--out", str(out), "--group-size", "64", "--calib-data",
                 str(corpus), "--calib-samples", "16", "--calib-seq-len", "64", "--quiet",
                 "--device", "cpu"]) == 0
    assert "0.2" in capsys.readouterr().out   # packed experts ~0.27x of their bf16 bytes
    assert not list(trained.glob(".q.tmp-*"))
    results = {}
    for name in ("run", "q"):
        assert main(["eval", str(trained / name), "--json", "--device", "cpu"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["q"]["val_ppl"] <= 1.05 * results["run"]["val_ppl"]
    assert results["q"]["val_ppl"] != results["run"]["val_ppl"]   # it is a different model
    q, _, _ = load_run(out)
    assert isinstance(q.layers[0].attn.q_proj, QuantizedLinear)
    assert isinstance(q.layers[0].ffn.experts, QuantizedExperts)
    assert q.layers[0].ffn.router.weight.dtype == torch.float32
    # convert --to-hf writes AutoAWQ tensors that from_hf reads back to the same model
    assert main(["convert", "--to-hf", str(out), str(trained / "hf")]) == 0
    hf_cfg = json.loads((trained / "hf" / "config.json").read_text())
    assert hf_cfg["quantization_config"]["version"] == "gemm"
    again = from_hf(trained / "hf").eval()
    assert isinstance(again.layers[0].ffn.experts, QuantizedExperts)
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(again(tokens)[0], q(tokens)[0], atol=1e-5, rtol=0)
    # convert --from-hf of that directory is a quantized run directory again, the same model
    assert main(["convert", "--from-hf", str(trained / "hf"), str(trained / "from_hf")]) == 0
    back, _, _ = load_run(trained / "from_hf")
    assert isinstance(back.layers[0].ffn.experts, QuantizedExperts)
    with torch.no_grad():
        assert torch.equal(back(tokens)[0], again(tokens)[0])
    # generate reads the quantized run
    assert main(["generate", str(out), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    capsys.readouterr()
    # it holds the source's train_config for eval, but no training state to resume
    assert main(["train", "--resume", str(out), "--steps", "50"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dropless: error: ") and "quantized model" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,match", [
    (["--group-size", "48"], "--group-size 48 is invalid"),
    (["--bits", "3"], "--bits 3 is invalid"),
    (["--calib-samples", "0"], "--calib-samples 0 is invalid"),
    (["--calib-data", "/nonexistent/calib.txt"],   # the flag given, not train's --data
     "dropless: error: --calib-data /nonexistent/calib.txt: no such file or directory"),
])
def test_quantize_errors(trained, capsys, args, match):
    assert main(["quantize", str(trained / "run"), "--out", str(trained / "bad"), *args]) == 1
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_quantize_refuses_existing_out_and_quantized_src(trained, capsys, corpus):
    (trained / "full").mkdir(exist_ok=True)
    (trained / "full" / "x").write_text("")
    assert main(["quantize", str(trained / "run"), "--out", str(trained / "full")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    if (trained / "q").exists():
        assert main(["quantize", str(trained / "q"), "--out", str(trained / "qq")]) == 1
        assert "already quantized" in capsys.readouterr().err
    assert main(["eval", str(trained / "nope")]) == 1
    assert "no such run" in capsys.readouterr().err
    (trained / "badhf").mkdir(exist_ok=True)
    (trained / "badhf" / "config.json").write_text('{"model_type": "mixtral"')
    assert main(["quantize", str(trained / "badhf"), "--out", str(trained / "qbad")]) == 1
    err = capsys.readouterr().err   # the HF reader's ValueError, as one line
    assert err.startswith("dropless: error: ") and "config.json is not readable JSON" in err
    assert err.count("\n") == 1


@pytest.mark.gpu
def test_quantized_model_kernels_match_reference_on_gpu():
    """quantize_model on the GPU; the model's forward through the int4 kernels (prefill and
    cached decode) against the same packed weights on the CPU reference path. Compared in fp32:
    under bf16 autocast this random tiny model's logits move by ~0.16 (relative) on the CPU
    alone (routing near-ties flip), far more than any kernel error."""
    from dropless.generate import generate

    model = tiny_model().cuda()
    calib = torch.randint(0, 256, (8, 64))
    q = quantize_model(model, calib, QuantConfig(group_size=64), progress=False)
    tokens = torch.randint(0, 256, (3, 40))
    with torch.no_grad():
        ref = copy.deepcopy(q).cpu()(tokens)[0]
        out = q(tokens.cuda())[0].float().cpu()
        assert rel_err(out, ref) < 5e-3
        prompt = tokens[0, :8].tolist()
        cpu_q = copy.deepcopy(q).cpu()
        assert generate(q, [prompt], 12, temperature=0) == generate(cpu_q, [prompt], 12,
                                                                    temperature=0)


def test_quantize_in_bf16_close_to_float(trained, corpus):
    """Large models are calibrated with bf16 weights and activations (searches in float32): the
    result stays within the same perplexity budget."""
    from contextlib import nullcontext
    from pathlib import Path

    from dropless import data
    from dropless.quant.run import calibration_tokens
    from dropless.train import evaluate

    model, tok, state = load_run(trained / "run")
    tc = state["train_config"]
    tokens = data.load_tokens(data.read_documents(tc["data"]), tok, Path(tc["cache_dir"]))
    windows = data.eval_batches(tokens.val, tc["batch_size"], tc["seq_len"], tc["eval_batches"])
    cpu = torch.device("cpu")
    base = evaluate(model, windows, cpu, nullcontext())
    calib = calibration_tokens(tok, str(corpus), 16, 64, tc["cache_dir"])
    q = quantize_model(model.to(torch.bfloat16), calib, QuantConfig(group_size=64), progress=False)
    assert q.layers[0].ffn_norm.weight.dtype == torch.bfloat16
    loss = evaluate(q.float(), windows, cpu, nullcontext())
    assert loss < base + math.log(1.05)   # perplexity within +5%
