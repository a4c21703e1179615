import dataclasses

import pytest
import torch

from dropless import ModelConfig, MoEConfig, Transformer
from dropless.generate import generate, greedy_recompute
from dropless.mla import MLAttention
from dropless.model import KVCache


def mla_config(q_lora_rank=24, **kw):
    dim = 64
    return ModelConfig(vocab_size=97, dim=dim, num_layers=2, num_heads=4, num_kv_heads=4,
                       max_seq_len=64, attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, first_dense_layers=1,
                       moe=MoEConfig(dim=dim, hidden_dim=32, num_experts=4, top_k=2), **kw)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cache_stores_only_latent_and_rope_key(q_lora_rank):
    cfg = mla_config(q_lora_rank)
    latent, rope = MLAttention(cfg).new_cache(3, 10, "cpu", torch.float32)
    assert latent.shape == (3, 10, cfg.kv_lora_rank) and rope.shape == (3, 10, cfg.qk_rope_head_dim)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cached_decoding_matches_recompute(q_lora_rank):
    torch.manual_seed(0)
    model = Transformer(mla_config(q_lora_rank)).eval()
    tokens = torch.randint(0, 97, (2, 12))
    full, _ = model(tokens)
    # prefill 5 tokens, then decode one at a time through the compressed cache
    cache = KVCache(model, 2, 12)
    steps = [model(tokens[:, :5], cache)[0]]
    for t in range(5, 12):
        steps.append(model(tokens[:, t:t + 1], cache)[0])
    cached = torch.cat(steps, dim=1)
    err = (cached - full).norm() / full.norm()
    assert err < 1e-5, err
    prompt = tokens[0, :4].tolist()
    assert generate(model, [prompt], 10, temperature=0) == [greedy_recompute(model, prompt, 10)]


def test_ragged_prompts_match_recompute():
    torch.manual_seed(1)
    model = Transformer(mla_config()).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6]]
    out = generate(model, prompts, 6, temperature=0)
    assert out == [greedy_recompute(model, p, 6) for p in prompts]


def test_gradients_flow_through_every_mla_weight():
    torch.manual_seed(2)
    model = Transformer(mla_config())
    logits, _ = model(torch.randint(0, 97, (2, 7)))
    logits.square().mean().backward()
    attn = model.layers[0].attn
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_cache_close_to_fp32():
    torch.manual_seed(3)
    model = Transformer(mla_config()).eval()
    tokens = torch.randint(0, 97, (1, 9))
    ref, _ = model(tokens)
    model = model.to(torch.bfloat16)
    cache = KVCache(model, 1, 9)
    out = torch.cat([model(tokens[:, :4], cache)[0]] +
                    [model(tokens[:, t:t + 1], cache)[0] for t in range(4, 9)], dim=1)
    assert ((out.float() - ref).norm() / ref.norm()) < 3e-2


def test_mla_config_fields_validated():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        dataclasses.replace(mla_config(), kv_lora_rank=0)
