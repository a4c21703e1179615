"""AWQ int4 bugs an adversarial review found: each test failed before its fix."""

import dataclasses
import json
import warnings

import pytest

from dropless import ModelConfig, MoEConfig, Transformer
from dropless.checkpoint import config_to_dict, load_run
from dropless.cli import main
from dropless.parallel.checkpoint import save
from dropless.tokenizer import ByteTokenizer
from tests.test_quant_edges import error_line
from tests.test_quant_run import make_run, quantize


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """The CPU reference path, even when a kernel test switched the interpreter on earlier."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


CFG = ModelConfig(vocab_size=256, dim=64, num_layers=1, num_heads=2, num_kv_heads=1,
                  max_seq_len=64, moe=MoEConfig(num_experts=4, top_k=2, dim=64, hidden_dim=48))


@pytest.mark.parametrize("argv", [["eval", "{run}", "--device", "cpu"],
                                  ["generate", "{run}", "--max-new-tokens", "2"],
                                  ["convert", "--to-hf", "{run}", "{hf}"]])
def test_run_whose_quant_does_not_fit_its_model(tmp_path, capsys, argv):
    """A run directory (from a stranger) whose saved `quant` cannot hold its model's shapes (hidden
    48 is no whole number of 32-wide groups) is one error line naming state.json, not a
    ValueError traceback from building the packed modules."""
    run = tmp_path / "run"
    save(run, 0, Transformer(CFG), state={
        "model_config": config_to_dict(CFG), "tokenizer": ByteTokenizer().to_json(),
        "quant": {"bits": 4, "group_size": 32, "attention": True, "experts": True}})
    assert main([a.format(run=run, hf=tmp_path / "hf") for a in argv]) == 1
    err = error_line(capsys)
    assert "state.json: quant: " in err and "input features 48 are not a multiple of" in err


@pytest.mark.parametrize("field,value,match", [
    ("group_size", 32.0, "group_size=32.0 is invalid: allowed: (32, 64, 128)"),
    ("bits", 4.0, "bits=4.0 is invalid"),
    ("attention", "false", "attention='false' is invalid: must be true or false"),
    ("experts", 1, "experts=1 is invalid: must be true or false"),
])
def test_run_whose_quant_has_values_of_the_wrong_type(tmp_path, capsys, field, value, match):
    """state.json's quant read as JSON: group_size 32.0 passed `in (32, 64, 128)` and was a
    TypeError traceback where the packed buffers were built; attention "false" read as true.
    One line naming the field."""
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, hidden_dim=64))
    run = tmp_path / "run"
    quant = {"bits": 4, "group_size": 32, "attention": True, "experts": True, field: value}
    save(run, 0, Transformer(cfg), state={
        "model_config": config_to_dict(cfg), "tokenizer": ByteTokenizer().to_json(),
        "quant": quant})
    assert main(["generate", str(run), "--max-new-tokens", "2"]) == 1
    err = error_line(capsys)
    assert "state.json: quant: " in err and match in err


def test_quantize_hf_dir_whose_config_is_not_an_object(tmp_path, capsys):
    """config.json holding a JSON list: one line naming it, as eval and convert say, not an
    AttributeError traceback from looking up quantization_config in it."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    assert main(["quantize", str(tmp_path / "hf"), "--out", str(tmp_path / "q"), "--quiet",
                 "--device", "cpu"]) == 1
    assert "config.json: must hold a JSON object, not list" in error_line(capsys)
    assert not (tmp_path / "q").exists()



def test_quantize_into_the_current_directory(tmp_path, corpus, monkeypatch):
    """--out . (an empty working directory) is that directory: the temp path beside it had an
    empty name, a ValueError traceback after the whole calibration."""
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, hidden_dim=64))
    src = make_run(tmp_path / "src", cfg)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # experts without calibration tokens
        assert quantize(src, ".", corpus, "--group-size", "32") == 0
    assert "quant" in load_run(tmp_path / "here")[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "src"]   # no temp left


@pytest.mark.parametrize("device", ["meta", "mps"])
@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_devices_that_cannot_run_refused(tmp_path, capsys, command, device):
    """--device meta (no data) or mps: one line, not NotImplementedError 'Cannot copy out of
    meta tensor' (or a missing-backend RuntimeError) from deep in the load."""
    run = make_run(tmp_path / "run", dataclasses.replace(CFG, moe=dataclasses.replace(
        CFG.moe, hidden_dim=64)))
    out = ["--out", str(tmp_path / "q")] if command == "quantize" else []
    assert main([command, str(run), *out, "--device", device]) == 1
    assert f"--device {device}: only cpu and cuda are supported" in error_line(capsys)


def test_eval_of_a_loss_past_exp_range(tmp_path, corpus, capsys):
    """A model whose loss passes ~709 nats (huge logits: a broken quantization, a stranger's
    weights) reports an infinite perplexity, not an OverflowError traceback from math.exp."""
    def huge_logits(model):
        model.norm.weight.mul_(1e4)
    run = make_run(tmp_path / "run", dataclasses.replace(CFG, moe=dataclasses.replace(
        CFG.moe, hidden_dim=64)), huge_logits)
    assert main(["eval", str(run), "--device", "cpu", "--data", str(corpus), "--json"]) == 0
    r = strict_json(capsys.readouterr().out)
    assert r["val_loss"] > 1000 and r["val_ppl"] is None   # infinite: null in strict JSON


def test_int4_scales_keep_fp16_when_the_model_goes_to_bf16():
    """A served model is loaded as bf16 (.to(bf16)): the packed scales stay fp16 (bf16 would
    round them, changing every dequantized weight), codes unchanged; float32 is exact and taken."""
    import torch

    from dropless.quant.modules import QuantizedExperts, QuantizedLinear
    torch.manual_seed(0)
    lin = QuantizedLinear.from_linear(torch.nn.Linear(128, 64, bias=False), 64)
    experts = QuantizedExperts(4, 128, 64, 64)
    experts.gate_up.scales.uniform_(1e-3, 1)
    for module in (lin, experts):
        before = {k: v.clone() for k, v in module.state_dict().items()}
        module.to(torch.bfloat16)
        after = module.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
        module.to(torch.float32)
        assert all(t.dtype == torch.float32 for k, t in module.state_dict().items()
                   if k.endswith("scales"))


DENSE = ModelConfig(vocab_size=256, dim=64, num_layers=2, first_dense_layers=2, num_heads=2,
                    num_kv_heads=1, max_seq_len=64, dense_hidden_dim=64,
                    moe=MoEConfig(num_experts=4, top_k=2, dim=64, hidden_dim=48))
DENSE_MLA = dataclasses.replace(DENSE, attention="mla", kv_lora_rank=32, qk_nope_head_dim=16,
                                qk_rope_head_dim=16, v_head_dim=16)


def test_dense_model_is_checked_for_what_it_has(tmp_path, corpus):
    """A model without MoE layers builds no experts: the expert shapes of its MoEConfig (hidden
    48, no whole 32-wide groups) refused it although only its attention is quantized."""
    from dropless.quant.modules import QuantConfig, check_quantizable

    check_quantizable(DENSE, QuantConfig(group_size=32))
    with pytest.raises(ValueError, match="experts.down: input features 48"):
        check_quantizable(dataclasses.replace(DENSE, first_dense_layers=1),
                          QuantConfig(group_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(make_run(tmp_path / "run", DENSE), tmp_path / "q", corpus,
                        "--group-size", "32") == 0
    assert load_run(tmp_path / "q")[2]["quant"]["group_size"] == 32


@pytest.mark.parametrize("cfg,qcfg", [
    (DENSE_MLA, {}),
    (DENSE, {"attention": False}),
    (dataclasses.replace(CFG, attention="mla", kv_lora_rank=32, qk_nope_head_dim=16,
                         qk_rope_head_dim=16, v_head_dim=16), {"experts": False}),
])
def test_nothing_to_quantize(cfg, qcfg):
    from dropless.quant.modules import QuantConfig, check_quantizable

    with pytest.raises(ValueError, match="nothing to quantize"):
        check_quantizable(cfg, QuantConfig(group_size=32, **qcfg))


def test_quantize_of_a_model_with_nothing_to_quantize(tmp_path, corpus, capsys):
    """No MoE layer and MLA attention (whose projections stay float): quantize wrote a
    'quantized' run holding the float model; now one line says why nothing was done."""
    assert quantize(make_run(tmp_path / "run", DENSE_MLA), tmp_path / "q", corpus) == 1
    err = error_line(capsys)
    assert "nothing to quantize" in err and "no MoE layer" in err and "mla" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("flags,match,max_seq_len", [
    (["--calib-samples", str(2**62)], f"--calib-samples {2**62} is invalid: must be in [1, 65536]",
     64),
    (["--calib-samples", "16385", "--calib-seq-len", "64"],
     "--calib-samples 16385 is invalid: must be in [1, 16384] with --calib-seq-len 64", 64),
    (["--calib-seq-len", str(2**20 + 1)], f"--calib-seq-len {2**20 + 1} is invalid: must be in "
     f"[1, {2**20}] (the model's max_seq_len={2**21}; at most 1,048,576 calibration tokens)",
     2**21),
])
def test_calibration_size_bounded(tmp_path, corpus, capsys, flags, match, max_seq_len):
    """Every layer's calibration activations are held at once: --calib-samples had no upper
    bound (2**62 was a ValueError traceback from numpy, a large one ran out of memory); at most
    2**20 tokens in all, refused in one line naming the range (before the model loads)."""
    cfg = dataclasses.replace(CFG, max_seq_len=max_seq_len, moe=dataclasses.replace(
        CFG.moe, hidden_dim=64))
    run = make_run(tmp_path / "run", cfg)
    assert quantize(run, tmp_path / "q", corpus, "--group-size", "32", *flags) == 1
    assert match in error_line(capsys)
    assert not (tmp_path / "q").exists()


def strict_json(text: str):
    """RFC 8259 JSON only: Python's json writes and reads NaN and Infinity, which jq, JavaScript
    and most other readers reject."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_eval_json_of_a_nan_loss_is_strict(tmp_path, corpus, capsys):
    """A NaN loss (NaN weights) printed `{"val_loss": NaN, "val_ppl": NaN}`, which no strict JSON
    reader accepts: non-finite values are null."""
    def poison(model):
        model.norm.weight[0] = float("nan")
    run = make_run(tmp_path / "run", dataclasses.replace(CFG, moe=dataclasses.replace(
        CFG.moe, hidden_dim=64)), poison)
    assert main(["eval", str(run), "--device", "cpu", "--data", str(corpus), "--json"]) == 0
    assert strict_json(capsys.readouterr().out) == {"val_loss": None, "val_ppl": None}


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    """An AutoAWQ Mixtral directory with a tokenizer.json, as `convert --from-hf` needs."""
    from tests.test_hf import hf_model, small_tokenizer
    from tests.test_quant_hf import write_awq

    root = tmp_path_factory.mktemp("awq")
    hf_model("mixtral").save_pretrained(root / "src")
    awq, _ = write_awq(root / "src", root)
    (awq / "tokenizer.json").write_text(small_tokenizer(60).to_str())
    return awq


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("value", [1e6, float("inf"), float("nan"), 1e-30])
def test_awq_scales_fp16_cannot_hold_refused(awq_dir, tmp_path, capsys, dtype, value):
    """The packed modules keep fp16 scales (a run directory loads them into fp16 buffers): an F32
    or BF16 scale past 65504 was written as inf (a tiny one as 0) without a word, and a file's
    NaN or inf scale made its groups NaN. Refused, naming the tensor; scales that fit load
    exactly, in whatever float dtype the file holds them."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.block_sparse_moe.experts.1.w1.scales"
    if dtype == "float16" and value in (1e6, 1e-30):
        pytest.skip("the file's dtype cannot hold it")
    shutil.copytree(awq_dir, tmp_path / "awq")
    state = load_file(tmp_path / "awq" / "model.safetensors")
    state.update({k: t.to(getattr(torch, dtype)) for k, t in state.items() if k.endswith("scales")})
    save_file(state, tmp_path / "awq" / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", "--from-hf", str(tmp_path / "awq"), str(tmp_path / "ok")]) == 0
    scales = load_run(tmp_path / "ok")[0].layers[0].ffn.experts.gate_up.scales
    assert torch.equal(scales[1, :, :scales.shape[-1] // 2], state[name].half())
    capsys.readouterr()
    state[name][1, 3] = value
    save_file(state, tmp_path / "awq" / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", "--from-hf", str(tmp_path / "awq"), str(tmp_path / "bad")]) == 1
    assert name in error_line(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_awq_packed_scales_held_in_fp16_as_their_run_holds_them(awq_dir, tmp_path, dtype):
    """from_hf kept an F32 or BF16 file's packed scales in that dtype, while `convert --from-hf`
    saves them into the fp16 buffers of a run: `generate HF_DIR` and `generate RUN` of the same
    file computed different logits. Both hold the fp16 scales now."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dropless import from_hf
    from dropless.quant.modules import Int4Weight

    shutil.copytree(awq_dir, tmp_path / "awq")
    state = load_file(tmp_path / "awq" / "model.safetensors")
    gen = torch.Generator().manual_seed(0)   # scales fp16 rounds (an F32 export's may be)
    state.update({k: (t.float() * (1 + 1e-3 * torch.rand(t.shape, generator=gen))).to(
        getattr(torch, dtype)) for k, t in state.items() if k.endswith("scales")})
    save_file(state, tmp_path / "awq" / "model.safetensors", metadata={"format": "pt"})
    model = from_hf(tmp_path / "awq").eval()
    assert {m.scales.dtype for m in model.modules() if isinstance(m, Int4Weight)} == \
        {torch.float16}
    assert main(["convert", "--from-hf", str(tmp_path / "awq"), str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")[0]
    x = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x)[0], run(x)[0])


def test_awq_nan_scale_of_a_dequantized_linear_refused(awq_dir, tmp_path):
    """Attention quantized only in part is dequantized into float modules: a NaN scale there
    made its group's float weights NaN without a word."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dropless import from_hf
    from dropless.quant.pack import dequantize

    shutil.copytree(awq_dir, tmp_path / "awq")
    state = load_file(tmp_path / "awq" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"   # float in the file: the other projections dequantize
    state[f"{q}.weight"] = dequantize(*(state.pop(f"{q}.{p}") for p in
                                        ("qweight", "qzeros", "scales"))).T.contiguous()
    state["model.layers.1.self_attn.k_proj.scales"][0, 1] = float("nan")
    save_file(state, tmp_path / "awq" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.scales\[0, 1\] = nan "
                                         "is not finite"):
        from_hf(tmp_path / "awq")
