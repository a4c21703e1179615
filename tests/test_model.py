import dataclasses
import re

import pytest
import torch

from dropless import ModelConfig, MoEConfig, Transformer, get_preset
from dropless.generate import generate, greedy_recompute
from dropless.info import format_stats, model_stats
from dropless.serve.moe_decode import kmajor_experts
from tests.conftest import rel_err


def tiny(**kw):
    cfg = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
               moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2))
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg))


def test_forward_shapes_and_aux():
    model = tiny(first_dense_layers=1)
    logits, aux = model(torch.randint(0, 64, (3, 10)))
    assert logits.shape == (3, 10, 64)
    assert aux.tokens_per_expert.shape == (1, 4)       # one MoE layer
    assert int(aux.tokens_per_expert.sum()) == 3 * 10 * 2
    assert aux.balance_loss.requires_grad


def test_causal():
    model = tiny()
    tokens = torch.randint(0, 64, (1, 12))
    logits, _ = model(tokens)
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :8], logits2[:, :8])
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:])


@pytest.mark.parametrize("kw", [dict(), dict(qk_norm=True, attention_bias=True),
                                dict(num_kv_heads=1, tie_embeddings=True)])
def test_kv_cache_greedy_equals_recompute(kw):
    model = tiny(**kw)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [33]]
    out = generate(model, prompts, 20, temperature=0)
    for p, o in zip(prompts, out):
        assert o == greedy_recompute(model, p, 20)


def test_generate_stops_each_row_after_its_eos():
    """eos_id: a row ends with the first EOS it samples (kept); the other rows run on."""
    model = tiny()
    prompts = [[1, 2, 3], [9, 8]]
    free = generate(model, prompts, 12, temperature=0)
    eos = free[0][4]
    out = generate(model, prompts, 12, temperature=0, eos_id=eos)
    for row, full in zip(out, free):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:end]
    assert len(out[0]) <= 5 < len(free[0])


def test_kept_engine_sees_weight_changes(monkeypatch):
    """generate() keeps its last engine (on CUDA, for the captured graphs; here by patching): a
    later call after the weights changed in place (an optimizer step, load_state_dict) or were
    replaced samples from the new weights, the stacked q|k|v copy included."""
    import dropless.generate as gen

    monkeypatch.setattr(gen, "_keeps", lambda device: True)
    monkeypatch.setattr(gen, "_KEPT", [])
    model = tiny()
    prompts = [[1, 2, 3], [9, 8]]
    assert generate(model, prompts, 8, temperature=0) == [greedy_recompute(model, p, 8)
                                                          for p in prompts]
    engine = gen._KEPT[0][1]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    logits, aux = model(torch.randint(0, 64, (2, 16)))
    (logits.square().mean() + aux.balance_loss).backward()
    optimizer.step()
    with torch.no_grad():   # and a change that only q/k/v see
        model.layers[0].attn.k_proj.weight.mul_(-3)
    out = generate(model, prompts, 8, temperature=0)
    assert gen._KEPT[0][1] is engine   # reused
    assert out == [greedy_recompute(model, p, 8) for p in prompts]
    model.layers[1].attn.v_proj.weight = torch.nn.Parameter(torch.randn(16, 32))
    out = generate(model, prompts, 8, temperature=0)
    assert gen._KEPT[0][1] is not engine   # a replaced parameter: a new engine
    assert out == [greedy_recompute(model, p, 8) for p in prompts]
    engine = gen._KEPT[0][1]   # experts laid out anew in their own memory: the kept graphs would
    assert kmajor_experts(model, ("cpu",)) > 0   # read them in the old layout (round 24, GPU)
    out = generate(model, prompts, 8, temperature=0)
    assert gen._KEPT[0][1] is not engine
    assert out == [greedy_recompute(model, p, 8) for p in prompts]


@pytest.mark.parametrize("fail", ["on_token", "bad-id"])
def test_a_failed_call_leaves_nothing_in_the_kept_engine(monkeypatch, fail):
    """A call stopped midway (Ctrl-C, a raising on_token) or refused on its last prompt left its
    requests in the kept engine (on CUDA): the next call of that shape decoded them too, and
    their on_token printed into its output."""
    import dropless.generate as gen

    monkeypatch.setattr(gen, "_keeps", lambda device: True)
    monkeypatch.setattr(gen, "_KEPT", [])
    model, prompts, seen = tiny(), [[1, 2, 3], [9, 8]], []
    generate(model, prompts, 8, temperature=0)   # an engine of this shape, kept

    def on_token(row, token):
        seen.append(row)
        if len(seen) == 3:
            raise RuntimeError("on_token failed")   # as Ctrl-C does

    with pytest.raises(RuntimeError if fail == "on_token" else ValueError):
        generate(model, prompts if fail == "on_token" else [[1, 2, 3], [64]], 8,
                 temperature=0, on_token=on_token)
    seen.clear()
    out = generate(model, prompts, 8, temperature=0, on_token=lambda row, token: None)
    assert out == [greedy_recompute(model, p, 8) for p in prompts] and not seen


def test_kv_cache_logits_equal_full_forward():
    from dropless.model import KVCache
    model = tiny().eval()
    tokens = torch.randint(0, 64, (2, 15))
    full, _ = model(tokens)
    cache = KVCache(model, 2, 32)
    parts = [model(tokens[:, :6], cache)[0]] + [model(tokens[:, i:i + 1], cache)[0]
                                                for i in range(6, 15)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_filters_and_seed():
    from dropless.serve.sampling import sample   # what generate samples with (the engine's)

    def picks(temperature: float, top_k: int, top_p: float, n: int) -> set[int]:
        rows = (torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p),
                torch.arange(n), torch.zeros(n, dtype=torch.long))
        return set(sample(torch.tensor([[0.0, 1.0, 5.0, 2.0]]).expand(n, 4), *rows).tolist())

    assert picks(0.0, 4, 1.0, 1) == {2}
    assert picks(1.0, 2, 1.0, 100) <= {2, 3}
    assert picks(1.0, 4, 0.5, 50) == {2}
    model = tiny()
    a = generate(model, [[1, 2]], 10, temperature=1.0, seed=7)
    b = generate(model, [[1, 2]], 10, temperature=1.0, seed=7)
    assert a == b


def test_generate_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1]], 100)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[]], 3)


def test_update_bias_touches_only_biased_layers():
    moe = MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2, score_func="sigmoid",
                    bias_update_rate=0.1)
    model = tiny(moe=moe)
    model.update_bias(torch.tensor([[10, 0, 0, 0], [0, 0, 0, 10]]))
    b0, b1 = (m.router.bias for m in model.moe_layers())
    assert b0[0] < 0 < b0[1] and b1[3] < 0 < b1[0]


def test_info_tiny_matches_hand_count():
    cfg = get_preset("tiny")   # dim 128, 4 layers, 4 heads / 2 kv heads of 32, 8 experts of 128, top-2
    attn = 128 * 128 + 2 * (128 * 64) + 128 * 128
    expert = 3 * 128 * 128
    layer = attn + 2 * 128 + 8 * 128 + 8 * expert
    total = 4 * layer + 256 * 128 + 128          # tied embedding, final norm
    s = model_stats(cfg, seq_len=512)
    assert s["total_params"] == total == 1_807_488
    active = total - 4 * 6 * expert
    assert s["active_params"] == active
    assert s["step_params"] == active   # tied: the whole table is read, as the LM head
    step = next(line for line in format_stats(s).splitlines() if line.startswith("bf16 weights"))
    assert step.endswith(f"{2 * active / 2**30:.2f} GiB")
    assert s["train_flops_per_token"] == 6 * active + 6 * 4 * 4 * (32 + 32) * 512
    adam = next(line for line in format_stats(s).splitlines() if line.startswith("Adam state"))
    assert adam.endswith(f"{8 * total / 2**30:.2f} GiB")


def test_presets_build_on_meta():
    for name in ("mixtral-8x7b", "olmoe-1b-7b", "qwen3-30b-a3b"):
        s = model_stats(get_preset(name))
        assert s["active_params"] < s["total_params"]
    assert 46.6e9 < model_stats(get_preset("mixtral-8x7b"))["total_params"] < 46.8e9
    cfg = get_preset("qwen3-30b-a3b")   # untied: a decode step reads one row of the embedding
    s = model_stats(cfg)
    assert s["active_params"] - s["step_params"] == (cfg.vocab_size - 1) * cfg.dim
    assert 3.04e9 < s["step_params"] < 3.05e9   # 1.43 ms a step at 4.24 TB/s (issue 11)


def test_bad_model_config():
    with pytest.raises(ValueError, match="moe.dim"):
        dataclasses.replace(get_preset("tiny"), dim=64)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="preset"):
        get_preset("gpt-5")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("tokens,message", [
    (torch.tensor([[1, 64, 2]]), "token id 64 is invalid: ids must be in [0, 63] (vocab_size=64)"),
    (torch.tensor([[1, -1, 2]]), "token id -1 is invalid"),
    (torch.tensor([[1.0, 2.0]]), "tokens.dtype=torch.float32 is invalid: token ids must be int64 or int32"),
    (torch.tensor([[True]]), "tokens.dtype=torch.bool is invalid"),
    (torch.tensor([[3]], dtype=torch.uint8), "tokens.dtype=torch.uint8 is invalid"),
    (torch.zeros(1, 65, dtype=torch.long), "sequence length 65 is invalid: at most max_seq_len=64"),
    (torch.zeros(3, dtype=torch.long), "tokens.shape=(3,) is invalid"),
])
def test_forward_refuses_bad_tokens(tokens, message, train):
    model = tiny().train(train)
    with pytest.raises(ValueError, match=re.escape(message)):
        model(tokens)


def test_forward_accepts_boundary_ids_and_int32():
    model = tiny().eval()
    ref, _ = model(torch.tensor([[0, 63, 5, 63]]))
    out, _ = model(torch.tensor([[0, 63, 5, 63]], dtype=torch.int32))
    assert torch.equal(out, ref)


def test_kv_cache_bounds():
    from dropless.model import KVCache
    model = tiny().eval()
    with pytest.raises(ValueError, match="KV cache max_len=65 is invalid: must be <= the model's "
                                         "max_seq_len=64"):
        KVCache(model, 1, 65)
    cache = KVCache(model, 2, 8)
    model(torch.ones(2, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="KV cache of length 8 is full: 3 more tokens would fill it to 9"):
        model(torch.ones(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="sequence length 9 is invalid.*KV cache length 8"):
        model(torch.ones(2, 9, dtype=torch.long), KVCache(model, 2, 8))
    with pytest.raises(ValueError, match="token id 64"):
        model(torch.full((2, 1), 64), cache)
    assert cache.lengths_B.tolist() == [6, 6]   # nothing was written by the refused calls


def test_training_mode_off_cpu_reads_no_token_values():
    """On an accelerator in training mode the id range is not checked (it would cost a host sync
    per micro-batch). Meta tensors stand in for device tensors: reading one raises."""
    model = tiny().train()
    model.check_tokens(torch.empty(2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="sequence length 65"):   # shapes are still checked
        model.check_tokens(torch.empty(2, 65, dtype=torch.long, device="meta"))
    with pytest.raises(NotImplementedError):   # eval mode reads the values
        model.eval().check_tokens(torch.empty(2, 5, dtype=torch.long, device="meta"))


@pytest.mark.gpu
def test_cuda_training_forward_check_is_sync_free():
    model = tiny().cuda().train()
    tokens = torch.randint(0, 64, (2, 16), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.check_tokens(tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="token id 64"):
        model.eval().check_tokens(torch.full((1, 3), 64, device="cuda"))


@pytest.mark.parametrize("field,value", [("norm_eps", float("nan")), ("norm_eps", -1.0),
                                         ("norm_eps", 0.0), ("rope_theta", float("inf")),
                                         ("rope_theta", float("nan"))])
def test_model_config_refuses_non_finite_eps_and_theta(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid: must be a finite number > 0"):
        dataclasses.replace(get_preset("tiny"), **{field: value})


@pytest.mark.parametrize("change,message", [
    (dict(num_layers=1025), "num_layers=1025 is invalid: must be an integer in [1, 1024]"),
    (dict(vocab_size=2**24 + 1), "vocab_size=16777217 is invalid: must be an integer in [1, "),
    (dict(moe=dict(num_experts=4097)), "num_experts=4097 is invalid: must be an integer in [1, 4096]"),
    (dict(moe=dict(route_scale="2")), "route_scale='2' is invalid: must be a finite number > 0"),
    (dict(moe=dict(route_scale=float("inf"))), "route_scale=inf is invalid"),
    (dict(tie_embeddings="false"), "tie_embeddings='false' is invalid: allowed: False, True"),
    (dict(head_dim=1026), "head_dim=1026 is invalid: must be an integer in [1, 1024]"),
    (dict(dim=2048, num_heads=1, num_kv_heads=1, moe=dict(dim=2048)),
     "head_dim=2048 is invalid: must be an integer in [1, 1024] (dim=2048 // num_heads=1)"),
    (dict(attention="mla", qk_rope_head_dim=2048), "qk_rope_head_dim=2048 is invalid: must be an "
     "integer in [1, 1024]"),
])
def test_model_config_bounds_sizes_and_checks_types(change, message):
    """The bounds a config file's sizes must pass (dropless.config.LIMITS), and types: a 'false'
    read as true, a string compared with a number (a TypeError traceback)."""
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **change.pop("moe", {})), **change)


def test_rope_tables_fit_a_fixed_budget_whatever_the_head_width():
    """A 35 KB config.json (one head of 1024 dims, 65536 positions) built 1.7 GB of tables."""
    with torch.device("meta"):   # the shapes, without the allocation
        model = tiny(dim=8, num_heads=1, num_kv_heads=1, head_dim=1024, max_seq_len=2**16,
                     moe=MoEConfig(dim=8, hidden_dim=8, num_experts=1, top_k=1))
    assert model.rope_cos.shape[1] == 1024 and model.rope_cos.numel() <= 2**24   # 64 MiB
    assert model.rope_sin.shape == model.rope_cos.shape


def test_rope_table_is_fp32_unsaved_and_matches_per_forward_tables(monkeypatch):
    import dropless.model as m
    from dropless.model import rope_tables
    model = tiny()
    cos, sin = rope_tables(model.cfg.rope_dim, torch.arange(64), model.cfg.rope_theta)
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert not any("rope" in k for k in model.state_dict())
    tokens = torch.randint(0, 64, (2, 9))
    want = model(tokens)[0]
    model.to(torch.bfloat16)   # the weights round; the table stays exact
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos)
    model.float()
    torch.testing.assert_close(model(tokens)[0], want, rtol=2e-2, atol=2e-2)
    # past the table (long contexts keep no table beyond ROPE_TABLE_MAX) the tables are computed
    full = tiny()
    monkeypatch.setattr(m, "ROPE_TABLE_MAX", 4)
    model = tiny()
    assert model.rope_cos.shape[0] == 4
    torch.testing.assert_close(model(tokens)[0], full(tokens)[0], rtol=0, atol=0)
    monkeypatch.undo()
    with torch.device("meta"):   # built on meta, then moved: tables are rebuilt, not copied
        model = tiny()
    model.to_empty(device="cpu")
    assert torch.equal(model.rope_cos, cos)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("B,H,G,T,Dh", [(2, 4, 2, 1, 16), (1, 16, 4, 77, 64), (2, 8, 8, 300, 128)])
def test_causal_attention_matches_math_reference(device, B, H, G, T, Dh):
    """The training attention (cuDNN's kernel on CUDA) against fp64 math attention: outputs and the
    gradients of q, k and v (grouped kv heads included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dropless.model import causal_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, n, T, Dh, generator=g) for n in (H, G, G))
    dout = torch.randn(B, H, T, Dh, generator=g)
    leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves, enable_gqa=G != H)
    out.backward(dout.to(device, dtype))
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, is_causal=True,
                                                               enable_gqa=G != H)
    ref.backward(dout.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(out.cpu(), ref) < tol
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad.cpu(), ref_leaf.grad) < tol
