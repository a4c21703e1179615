import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dropless import Transformer, from_hf, to_hf  # noqa: E402
from dropless.generate import generate  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
ARCHS = {
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, head_dim=16, norm_topk_prob=True,
                      mlp_only_layers=[0], num_hidden_layers=3),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=3, num_key_value_heads=4, n_group=4, topk_group=2,
                        first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        num_nextn_predict_layers=0),
    # DeepSeek-V2-Lite shape: full-rank queries, no group limit, two shared experts, half-split rope
    "deepseek_v3_lite": dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=6,
                             num_experts_per_tok=2, num_key_value_heads=4, n_group=1, topk_group=1,
                             n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                             routed_scaling_factor=1.0, norm_topk_prob=False, rope_interleave=False,
                             num_nextn_predict_layers=0),
}


@torch.no_grad()
def randomize(model, seed=0):
    """HF initialises with std 0.02 (near-uniform routing): spread every weight so routing, norms
    and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("gate.weight"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))


def hf_model(arch, seed=0):
    kw = {**COMMON, **ARCHS[arch]}
    model_type = "deepseek_v3" if arch.startswith("deepseek") else arch
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(model.float(), seed)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def saved(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    model = hf_model(arch)
    model.save_pretrained(path)
    return arch, model, path


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_logits_and_greedy_match_transformers(saved):
    arch, ref, path = saved
    model = from_hf(path).eval()
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got, aux = model(tokens)
    err = rel_err(got, want)
    assert err < 1e-4, err
    assert aux.tokens_per_expert.sum() > 0
    prompt = tokens[:1, :5]
    hf_out = ref.generate(prompt, max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert generate(model, [prompt[0].tolist()], 8, temperature=0) == [hf_out]


def test_round_trip_through_to_hf(saved, tmp_path):
    arch, ref, path = saved
    to_hf(from_hf(path), tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens = torch.randint(0, 97, (1, 9))
    if ref.config.to_dict().get("rope_interleave") is False:
        # written back interleaved (DeepSeek's own layout): same function, rope rows permuted
        assert back.config.rope_interleave
        with torch.no_grad():
            assert rel_err(back(tokens).logits, ref(tokens).logits) < 1e-6
        return
    want = ref.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref(tokens).logits)
    model_type = "deepseek_v3" if arch.startswith("deepseek") else arch
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type


def test_sharded_write_and_read(tmp_path):
    ref = hf_model("qwen2_moe")
    ref.save_pretrained(tmp_path / "src")
    model = from_hf(tmp_path / "src")
    to_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    again = from_hf(tmp_path / "out")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # transformers reads every tensor of the shards (none missing, none left over): the source
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = ref.state_dict()
    assert back.state_dict().keys() == want.keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    tokens = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref(tokens).logits)


def test_to_hf_builds_one_shard_at_a_time(tmp_path, monkeypatch):
    """Each shard's tensors are made as it is written and gone before the next is made: the host
    never holds a second copy of the whole model (a 30B model's 61 GB bf16, twice)."""
    import gc
    import weakref

    from dropless import hf

    model, made, alive, sizes = from_hf_fresh("qwen2_moe", tmp_path / "src"), [], [], []
    save = hf.save_safetensors

    def watched(tensors, path, metadata=None):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))
        made.extend(weakref.ref(t) for t in tensors.values())
        sizes.append(sum(t.nbytes for t in tensors.values()))
        save(tensors, path, metadata)

    monkeypatch.setattr(hf, "save_safetensors", watched)
    to_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    assert len(alive) > 2 and alive == [0] * len(alive)
    assert all(size <= max(20_000, biggest) for size in sizes)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(sizes)
    assert len(set(index["weight_map"].values())) == len(sizes)


def test_reading_and_writing_weights_show_a_bar(tmp_path, capsys, monkeypatch):
    """Past the bars' delay (2 s, 0 here) reading and writing say what they do and how far."""
    from dropless import tokenizer

    model = from_hf_fresh("mixtral", tmp_path / "src")
    assert "read src" not in capsys.readouterr().err   # under the delay: no bar
    monkeypatch.setattr(tokenizer, "BAR_DELAY_S", 0)
    to_hf(model, tmp_path / "out", max_shard_bytes=20_000)
    err = capsys.readouterr().err
    assert "write out" in err and "B/s" in err
    from_hf(tmp_path / "out")
    assert "read out" in capsys.readouterr().err


def from_hf_fresh(arch, path):
    hf_model(arch).save_pretrained(path)
    return from_hf(path)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_fused_expert_layout_reads(arch, tmp_path):
    """Files with the in-memory fused layout (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    from safetensors.torch import save_file

    ref = hf_model(arch)
    ref.save_pretrained(tmp_path / "per_expert")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "fused").mkdir()
    save_file(state, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "per_expert" / "config.json").read_text())
    a, b = from_hf(tmp_path / "fused"), from_hf(tmp_path / "per_expert")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_native_model_exports(tmp_path):
    from dropless import get_preset
    import dataclasses

    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    to_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        assert rel_err(model(tokens)[0], hf(tokens).logits) < 1e-4


# ---- bad input -------------------------------------------------------------------------------------

@pytest.fixture
def mixtral_dir(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    return tmp_path


def edit_tensors(path, fn):
    from safetensors.torch import load_file, save_file
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(tmp_path)


def test_unsupported_model_type(mixtral_dir):
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    (mixtral_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama' is not supported.*mixtral"):
        from_hf(mixtral_dir)


def test_config_lacking_a_field(mixtral_dir):
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    del cfg["intermediate_size"]
    (mixtral_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks the field 'intermediate_size'"):
        from_hf(mixtral_dir)


@pytest.mark.parametrize("field,value,arch", [
    ("sliding_window", 16, "mixtral"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "mixtral"),
    # the legacy field beside transformers 5's rope_parameters {"rope_type": "default"}: applied
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "mixtral"),
    ("decoder_sparse_step", 2, "qwen2_moe"),
    ("mlp_only_layers", [1], "qwen3_moe"),
    ("use_sliding_window", True, "qwen2_moe"),
    ("clip_qkv", 8.0, "olmoe"),
])
def test_unsupported_features_are_refused(field, value, arch, tmp_path):
    hf_model(arch).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, field: value}))
    assert "rope_parameters" in cfg
    name = "rope_type" if field.startswith("rope_") else field
    with pytest.raises(ValueError, match=name):
        from_hf(tmp_path)


def test_missing_unexpected_and_misshapen_are_all_listed(mixtral_dir):
    def damage(state):
        del state["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        state["model.norm.weight"] = torch.zeros(63)
    edit_tensors(mixtral_dir, damage)
    with pytest.raises(ValueError) as err:
        from_hf(mixtral_dir)
    msg = str(err.value)
    assert msg.startswith(f"{mixtral_dir}: weights do not match config.json:")   # which model
    assert "1 missing: model.layers.1.block_sparse_moe.experts.3.w2.weight" in msg
    assert "1 unexpected: model.layers.0.self_attn.extra.weight" in msg
    assert "1 misshapen: model.safetensors: model.norm.weight [63] (expected [64])" in msg


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_safetensors(mixtral_dir, keep):
    f = mixtral_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_hf(mixtral_dir)


def test_unexportable_config_is_refused(tmp_path):
    from dropless import ModelConfig, MoEConfig
    cfg = ModelConfig(vocab_size=50, dim=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      moe=MoEConfig(dim=32, hidden_dim=16, num_experts=4, top_k=2,
                                    norm_topk_prob=False))
    with pytest.raises(ValueError, match="moe.norm_topk_prob=False"):
        to_hf(Transformer(cfg), tmp_path)


def small_tokenizer(vocab_size):
    """A word-piece-like BPE with `vocab_size` tokens (any tokenizer.json, not only byte-level)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = " ".join(f"w{i}x{i * 7 % 13}" for i in range(400))
    tok.train_from_iterator([text] * 5, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False))
    assert tok.get_vocab_size() == vocab_size
    return tok


def test_hf_dir_keeps_tokenizer_json(mixtral_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from dropless.convert import load_hf_dir, save_hf_dir
    from dropless.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_json

    tok = small_tokenizer(60).to_str()
    (mixtral_dir / "tokenizer.json").write_text(tok)
    model, tok_json = load_hf_dir(mixtral_dir)
    assert tok_json == tok and not model.training
    save_hf_dir(model, tmp_path / "out", tok_json)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == tok
    # dropless's raw bytes: written as the equivalent byte-level tokenizers.Tokenizer
    save_hf_dir(model, tmp_path / "bytes", json.dumps({"type": "bytes"}))
    exported_json = (tmp_path / "bytes" / "tokenizer.json").read_text()
    assert isinstance(tokenizer_from_json(exported_json), ByteTokenizer)   # reads back as bytes
    exported = BPETokenizer(HFTokenizer.from_str(exported_json))   # and is the bytes' equal
    text = "def f(x):\n\treturn 'héllo ☃ 🎉' \x00\x7f  "
    assert exported.vocab_size == 256
    assert exported.encode(text).tolist() == ByteTokenizer().encode(text).tolist()
    assert exported.decode(ByteTokenizer().encode(text)) == text
    assert [exported.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]


def test_bf16_load_close_to_fp32(saved):
    arch, ref, path = saved
    model = from_hf(path, dtype=torch.bfloat16).eval()
    assert model.embed.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(tokens)[0], ref(tokens).logits) < 5e-2


def test_convert_reports_bad_input_in_one_line(tmp_path, capsys):
    from dropless.cli import main

    assert main(["convert", "--from-hf", str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and "Traceback" not in err
    assert main(["convert", str(tmp_path / "out"), "--to-hf", str(tmp_path / "nope")]) == 1
    assert "no such run directory" in capsys.readouterr().err


def test_cli_convert_and_generate_round_trip(tmp_path, capsys):
    """HF dir -> run dir -> generate (both) -> HF dir that transformers loads, through the CLI."""
    from dropless.cli import main
    from dropless.tokenizer import train_bpe

    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], 300)
    cfg = transformers.AutoConfig.for_model("mixtral", **{**COMMON, **ARCHS["mixtral"],
                                                          "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    randomize(hf)
    hf_dir, run_dir, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    hf.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(tok.to_json())
    assert main(["convert", "--from-hf", str(hf_dir), str(run_dir)]) == 0
    outs = []
    for src in (hf_dir, run_dir):
        capsys.readouterr()
        assert main(["generate", str(src), "--prompt", "def ", "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("def ")
    assert main(["convert", "--to-hf", str(run_dir), str(back)]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    tokens = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, rtol=1e-4, atol=1e-4)


# ---- untrusted files: every bad value is one line naming the file and the field, before any work ----

def native_hf_dir(path, **cfg_kw):
    """A HF directory written by dropless from a small native model (no transformers involved)."""
    import dataclasses
    from dropless import get_preset

    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, max_seq_len=64, **cfg_kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    to_hf(model, path)
    return model


def edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,message", [
    ("num_local_experts", 10**9, "num_local_experts=1000000000 is invalid: must be an integer in"),
    ("num_hidden_layers", 10**8, "num_hidden_layers=100000000 is invalid"),
    ("vocab_size", 2**40, "vocab_size=1099511627776 is invalid"),
    ("hidden_size", 0, "hidden_size=0 is invalid"),
    ("hidden_size", "128", "hidden_size='128' is invalid: must be an integer"),
    ("intermediate_size", 12.5, "intermediate_size=12.5 is invalid"),
    ("num_experts_per_tok", 9, "num_experts_per_tok=9 is invalid: must be an integer in [1, 8]"),
    ("num_attention_heads", True, "num_attention_heads=True is invalid"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan is invalid: must be a finite number in (0"),
    ("rms_norm_eps", -1, "rms_norm_eps=-1 is invalid"),
    ("rms_norm_eps", 0, "rms_norm_eps=0 is invalid"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("inf")}, "rope_theta=inf is invalid"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -1e4}, "rope_theta=-10000.0 is invalid"),
    ("rope_parameters", "fast", "rope_parameters='fast' is invalid: must be an object"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings='yes' is invalid: must be true or false"),
    ("router_aux_loss_coef", -0.1, "router_aux_loss_coef=-0.1 is invalid"),
    ("max_position_embeddings", 10**12, "max_position_embeddings=1000000000000 is invalid"),
    ("num_key_value_heads", 3, "num_kv_heads=3 is invalid: must divide num_heads=4 (num_kv_heads is "
                               "config.json's num_key_value_heads)"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method='gptq'"),
    ("sliding_window", "wide", "sliding_window='wide'"),
])
def test_hostile_config_values_refused_before_any_work(tmp_path, monkeypatch, field, value,
                                                       message):
    """The weights are removed: the error must come from config.json alone, before any weight
    file is opened or any model is built."""
    from dropless import hf

    def work(*args):
        raise AssertionError("from_hf went past the config")

    native_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    edit_config(tmp_path, **{field: value})
    monkeypatch.setattr(hf, "open_tensors", work)
    monkeypatch.setattr(hf, "Transformer", work)
    with pytest.raises(ValueError) as err:
        from_hf(tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "config.json") + ": ") and message in msg, msg
    assert "\n" not in msg


def test_too_many_expert_tensors_refused(tmp_path):
    native_hf_dir(tmp_path)
    edit_config(tmp_path, num_local_experts=4096, num_hidden_layers=1024)
    with pytest.raises(ValueError, match="1024 layers of 4096 experts.*more than the limit"):
        from_hf(tmp_path)


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not readable JSON"),
    ("[1, 2, 3]", "must hold a JSON object, not list"),
    ("null", "must hold a JSON object, not NoneType"),
    ('{"model_type": ["mixtral"]}', "model_type=['mixtral'] is not supported"),
    ('{"model_type": "mixtral", "mlp_only_layers": 3}', "hidden_size"),
])
def test_garbage_config_json_is_one_line_through_the_cli(tmp_path, capsys, text, message):
    from dropless.cli import main

    native_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(text)
    for argv in (["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")],
                 ["generate", str(tmp_path / "hf")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config.json" in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_integer_typed_float_weights_refused(tmp_path):
    native_hf_dir(tmp_path)

    def retype(state):
        state["model.norm.weight"] = state["model.norm.weight"].view(torch.int32)
        key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
        state[key] = state[key].view(torch.int32)
    edit_tensors(tmp_path, retype)
    with pytest.raises(ValueError) as err:
        from_hf(tmp_path)
    msg = str(err.value)
    assert "2 of the wrong dtype" in msg
    assert "model.safetensors: model.norm.weight is I32 (allowed: F16, BF16, F32, F64)" in msg
    assert "model.safetensors: model.layers.1.block_sparse_moe.experts.2.w1.weight is I32" in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_files_are_cast(tmp_path, dtype):
    model = native_hf_dir(tmp_path)
    edit_tensors(tmp_path, lambda state: state.update({k: v.to(dtype) for k, v in state.items()}))
    again = from_hf(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(dtype).float(), b), k




@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_index_may_not_point_outside_the_model_directory(tmp_path, where):
    from safetensors.torch import load_file

    hf_dir, secret = tmp_path / "hf", tmp_path / "elsewhere" / "weights.safetensors"
    native_hf_dir(hf_dir)
    secret.parent.mkdir()
    (hf_dir / "model.safetensors").rename(secret)
    target = {"absolute": str(secret), "dotdot": "../elsewhere/weights.safetensors",
              "symlink": "model-00001-of-00001.safetensors"}[where]
    if where == "symlink":
        (hf_dir / target).symlink_to(secret)
    index = {"weight_map": {k: target for k in load_file(secret)}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.safetensors.index.json.*(weights must be files "
                                         "inside|outside the model directory)"):
        from_hf(hf_dir)
    if where == "symlink":   # also without an index: a *.safetensors symlink out is refused
        (hf_dir / "model.safetensors.index.json").unlink()
        with pytest.raises(ValueError, match="outside the model directory"):
            from_hf(hf_dir)


def test_garbage_index_is_one_line(tmp_path):
    native_hf_dir(tmp_path)
    for text in ("{", '{"weight_map": [1]}', '{"weight_map": {"a": 7}}', "[]"):
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError) as err:
            from_hf(tmp_path)
        assert "model.safetensors.index.json" in str(err.value), text


def test_hub_cache_snapshot_symlinks_are_followed(tmp_path):
    """The HF hub cache keeps snapshots/<rev>/* as symlinks into the repo's blobs/: allowed."""
    from conftest import hub_cache_snapshot

    model = native_hf_dir(tmp_path / "src")
    again = from_hf(hub_cache_snapshot(tmp_path / "src", tmp_path / "models--org--tiny"))
    assert torch.equal(again.embed.weight, model.embed.weight)


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, capsys):
    from dropless.cli import main

    cfg = transformers.AutoConfig.for_model("mixtral", **{**COMMON, **ARCHS["mixtral"],
                                                          "vocab_size": 50})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(small_tokenizer(60).to_str())
    capsys.readouterr()
    for argv in (["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")],
                 ["generate", str(tmp_path / "hf")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "tokenizer.json has 60 tokens but config.json has vocab_size=50" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["{", "[]", '{"model": 3}', '{"version": "1.0"}', "\udcff"])
def test_garbage_tokenizer_json_is_one_line(tmp_path, capsys, text):
    from dropless.cli import main

    native_hf_dir(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(text, errors="surrogateescape")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json: " in err and "Traceback" not in err, err


def test_tied_embeddings_import(tmp_path):
    """tie_word_embeddings: true files store only the embedding; the import re-ties the head."""
    cfg = transformers.AutoConfig.for_model("qwen3_moe", **{**COMMON, **ARCHS["qwen3_moe"],
                                                            "tie_word_embeddings": True})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(ref.float())
    ref.eval().save_pretrained(tmp_path)
    model = from_hf(tmp_path).eval()
    assert model.lm_head.weight is model.embed.weight
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(model(tokens)[0], ref(tokens).logits) < 1e-4


def test_default_tiny_run_round_trips_through_hf(tmp_path, corpus, capsys):
    """The documented round trip for the default (tied, byte-tokenizer) run, through the CLI:
    train -> convert --to-hf -> generate HF_DIR, and -> convert --from-hf -> generate RUN."""
    from dropless.cli import main

    run, hf_dir, back = tmp_path / "run", tmp_path / "hf", tmp_path / "back"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--cache-dir",
                 str(tmp_path / "cache"), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                 "--sample-tokens", "0", "--quiet"]) == 0
    assert main(["convert", "--to-hf", str(run), str(hf_dir)]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert (hf_dir / "tokenizer.json").exists()
    assert main(["convert", "--from-hf", str(hf_dir), str(back)]) == 0
    outs = []
    for src in (run, hf_dir, back):
        capsys.readouterr()
        assert main(["generate", str(src), "--prompt", "def f(x):", "--temperature", "0",
                     "--max-new-tokens", "20"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].startswith("def f(x):")
    assert len(outs[0]) > len("def f(x):")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    from dropless.checkpoint import load_run
    model = load_run(run)[0]
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert rel_err(model(tokens)[0], hf(tokens).logits) < 1e-4


@pytest.mark.parametrize("value", [[0, "1"], "0,1", [0, None], [1, 0.5]])
def test_garbage_mlp_only_layers_names_the_field(tmp_path, value):
    from dropless.hf_config import config_from_hf, config_to_hf
    from dropless import get_preset

    hf = config_to_hf(get_preset("medium"))
    assert hf["model_type"] == "qwen3_moe"
    with pytest.raises(ValueError, match="config.json: unsupported Hugging Face config: mlp_only_layers="):
        config_from_hf({**hf, "mlp_only_layers": value})
    assert config_from_hf({**hf, "mlp_only_layers": [1, 0]}).first_dense_layers == 2


def test_every_preset_round_trips_through_its_spec():
    """Each exportable preset reads back from its own config.json as the same ModelConfig, except
    what config.json does not hold (the z-loss coefficient, the backend)."""
    import dataclasses
    from dropless import PRESETS
    from dropless.hf_config import config_from_hf, config_to_hf

    for name, model_type in (("tiny", "mixtral"), ("medium", "qwen3_moe"),
                             ("olmoe-1b-7b", "olmoe"), ("deepseek-v3", "deepseek_v3")):
        cfg = PRESETS[name]
        hf = config_to_hf(cfg)
        assert hf["model_type"] == model_type, name
        back = config_from_hf(hf)
        assert back.moe.balance_loss_coef == pytest.approx(cfg.moe.balance_loss_coef)
        assert back.head_size == cfg.head_size
        # head_dim and dense_hidden_dim: written explicitly (the latter unused without dense layers)
        back = dataclasses.replace(back, head_dim=cfg.head_dim, dense_hidden_dim=cfg.dense_hidden_dim,
                                   moe=dataclasses.replace(
            back.moe, z_loss_coef=cfg.moe.z_loss_coef, balance_loss_coef=cfg.moe.balance_loss_coef))
        assert back == cfg, name


@pytest.mark.parametrize("kind", ["sparse", "fifo", "non-utf8", "directory"])
def test_config_json_that_cannot_be_small_text_is_refused_unread(tmp_path, kind):
    """A stranger's config.json: a sparse 8 GiB file (refused by its size, never read), a FIFO
    (never opened: it would hang), bytes that are not UTF-8, a directory; one line each, naming
    the file once."""
    import os

    config = tmp_path / "config.json"
    if kind == "sparse":
        with open(config, "wb") as f:
            f.truncate(2**33)
    elif kind == "fifo":
        os.mkfifo(config)
    elif kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(b'{"model_type": "\xff"}')
    want = {"sparse": "over the", "fifo": "not a regular file", "non-utf8": "not readable JSON",
            "directory": "not a regular file"}
    with pytest.raises(ValueError, match=f"{config}.*{want[kind]}") as err:
        from_hf(tmp_path)
    assert str(err.value).count(str(config)) == 1, err.value


@pytest.mark.parametrize("arch,field", [("mixtral", "rms_norm_eps"), ("olmoe", "rms_norm_eps"),
                                        ("deepseek_v3", "routed_scaling_factor"),
                                        ("deepseek_v3", "n_shared_experts")])
def test_absent_fields_take_the_transformers_defaults(tmp_path, arch, field):
    """A config.json without a field means transformers' default for it (Mixtral's and OLMoE's
    rms_norm_eps is 1e-5, DeepSeek-V3's routed_scaling_factor 2.5, one shared expert): reading
    it otherwise is a different model, silently."""
    ref = hf_model(arch)
    assert field in ref.config.to_dict()
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[field]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    want_default = transformers.AutoConfig.for_model(cfg["model_type"]).to_dict()[field]
    assert getattr(ref.config, field) == want_default   # so the file means the same model
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(from_hf(tmp_path).eval()(tokens)[0], ref(tokens).logits) < 1e-4


@pytest.mark.parametrize("field,value,message", [
    ("rope_interleave", "false", "rope_interleave='false' is invalid: must be true or false"),
    ("rope_interleave", 0, "rope_interleave=0 is invalid"),
    # not blamed on num_key_value_heads, whose refusal compares with it
    ("num_attention_heads", "128", "num_attention_heads='128' is invalid: must be an integer"),
    ("n_group", None, "n_group=8 is invalid: must be an integer in [1, 4] (the field is absent"),
    # ModelConfig's own checks, named in the file's terms too
    ("n_group", 3, "num_groups=3 is invalid: must divide num_experts=4 (num_groups is config.json's "
                   "n_group)"),
])
def test_deepseek_config_values_name_their_field(field, value, message):
    import dataclasses
    from dropless import PRESETS
    from dropless.hf_config import config_from_hf, config_to_hf

    cfg = PRESETS["deepseek-v3"]
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4, num_groups=None,
                                                           topk_groups=None, top_k=2))
    hf = {**config_to_hf(cfg), field: value}
    with pytest.raises(ValueError) as err:
        config_from_hf(hf)
    assert message in str(err.value), err.value


@pytest.mark.parametrize("first,second", [(20_000, 2**40), (2**40, 20_000)])
def test_to_hf_again_into_the_same_directory_writes_the_new_weights(tmp_path, first, second):
    """Re-exporting (sharded after single-file, or the reverse) must not leave the previous save's
    index or model.safetensors behind: either would be loaded instead of the new weights."""
    old = from_hf_fresh("qwen2_moe", tmp_path / "src")
    new = from_hf(tmp_path / "src")
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    (tmp_path / "out" / "notes.txt").parent.mkdir()
    (tmp_path / "out" / "notes.txt").write_text("kept")
    to_hf(old, tmp_path / "out", max_shard_bytes=first)
    to_hf(new, tmp_path / "out", max_shard_bytes=second)
    assert (tmp_path / "out" / "notes.txt").read_text() == "kept"
    for (k, a), b in zip(new.state_dict().items(), from_hf(tmp_path / "out").state_dict().values()):
        assert torch.equal(a, b), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, new.eval()(tokens)[0]) < 1e-5


def test_deepseek_without_shared_experts_round_trips(tmp_path):
    """transformers keeps DeepSeek's shared experts at n_shared_experts=0, as empty tensors
    ([0, D] / [D, 0]) in its files: they hold no weight and must not make the file unreadable."""
    cfg = transformers.AutoConfig.for_model("deepseek_v3", **{**COMMON, **ARCHS["deepseek_v3"],
                                                              "n_shared_experts": 0})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(ref.float())
    ref.eval().save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf").eval()
    assert model.cfg.moe.num_shared_experts == 0
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(tokens).logits
        assert rel_err(model(tokens)[0], want) < 1e-4
    to_hf(model, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back",
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(back(tokens).logits, want) < 1e-6


def test_deepseek_multi_token_prediction_layers_are_skipped(tmp_path):
    """DeepSeek-V3 files carry num_nextn_predict_layers MTP layers after the last one (as
    model.layers.{num_hidden_layers + i}.*): skipped, and only those."""
    from safetensors.torch import load_file, save_file

    ref = hf_model("deepseek_v3")
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    L = ref.config.num_hidden_layers
    state[f"model.layers.{L}.eh_proj.weight"] = torch.zeros(64, 128)
    state[f"model.layers.{L}.enorm.weight"] = torch.ones(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"2 unexpected: model.layers.{L}.eh_proj.weight"):
        from_hf(tmp_path)   # the file says num_nextn_predict_layers=0
    edit_config(tmp_path, num_nextn_predict_layers=1)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(from_hf(tmp_path).eval()(tokens)[0], ref(tokens).logits) < 1e-4
    state[f"model.layers.{L + 1}.enorm.weight"] = torch.ones(64)   # past the declared MTP layers
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"1 unexpected: model.layers.{L + 1}.enorm.weight"):
        from_hf(tmp_path)


def test_each_tensor_goes_to_the_device_as_it_is_read(saved, monkeypatch):
    """from_hf(device=...) moves every tensor as it is read, before it joins the state: the host
    never holds the whole model (the meta device stands in for a GPU here)."""
    from dropless import hf

    arch, _, path = saved
    devices, fill = set(), hf._fill
    monkeypatch.setattr(hf, "_fill", lambda state, row, t, cfg: devices.add(t.device.type)
                        or fill(state, row, t, cfg))
    model = from_hf(path, torch.bfloat16, "meta")
    assert devices == {"meta"}
    assert all(p.device.type == "meta" for p in model.parameters())
