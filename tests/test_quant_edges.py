"""AWQ int4 at its edges: packing of extreme codes, shapes and settings that are refused (and how),
calibration corners (experts with no or one token, K == E, shared experts and their gate, dense
and MLA layers: what is quantized and what the scale folding keeps), and AutoAWQ checkpoints that
are partly quantized or malformed. Everything runs on the CPU reference path."""

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from dropless import ModelConfig, MoEConfig, from_hf, to_hf  # noqa: E402
from dropless.cli import main  # noqa: E402
from dropless.quant import calibrate, pack  # noqa: E402
from dropless.quant.modules import (Int4Weight, QuantConfig, QuantizedExperts,  # noqa: E402
                                    QuantizedLinear, check_quantizable)
from tests.conftest import rel_err  # noqa: E402
from tests.test_hf import hf_model  # noqa: E402
from tests.test_quant import tiny_model  # noqa: E402
from tests.test_quant_hf import write_awq  # noqa: E402
from tests.test_quant_pack import ORDER, numpy_unpack  # noqa: E402

@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """The CPU reference path, even when a kernel test switched the interpreter on earlier."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---- packing -----------------------------------------------------------------------------------

def _one_hot():
    codes = torch.zeros(8, 16, dtype=torch.int32)
    codes[torch.arange(8), torch.arange(8)] = 15
    return codes


CODES = {   # [rows, 16] codes, and the first word of row 0 worked out by hand
    "zeros": (torch.zeros(3, 16, dtype=torch.int32), 0),
    "fifteens": (torch.full((3, 16), 15, dtype=torch.int32), -1),
    "odd columns 15": (torch.tensor([[0, 15] * 8] * 3, dtype=torch.int32), -65536),   # 0xFFFF0000
    "even columns 15": (torch.tensor([[15, 0] * 8] * 3, dtype=torch.int32), 0xFFFF),
    "one 15 a row": (_one_hot(), 15),   # column 0 sits in nibble 0
}


@pytest.mark.parametrize("name", CODES)
def test_pack_extreme_codes(name):
    codes, word = CODES[name]
    packed = pack.pack(codes)
    assert packed[0, 0].item() == word
    np.testing.assert_array_equal(numpy_unpack(packed), codes.numpy())
    assert torch.equal(pack.unpack(packed), codes)
    if name == "one 15 a row":   # row c: only column c's nibble is set
        words = packed.numpy().view(np.uint32)[:, 0].tolist()
        assert words == [15 << 4 * ORDER.index(c) for c in range(8)]


def test_every_int32_word_unpacks_and_packs_back():
    words = torch.randint(-2**31, 2**31, (64, 4), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int64).to(torch.int32)
    words[0] = torch.tensor([-2**31, 2**31 - 1, -1, 0])
    assert torch.equal(pack.pack(pack.unpack(words)), words)


def test_constant_and_one_signed_groups():
    """A constant group (scale 0 before the floor) neither divides by zero nor gives NaN; groups of
    one sign put the zero point on an edge code and stay within half a step."""
    w = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    w[:32, 0], w[:32, 1], w[:32, 2] = 0.0, 2.5, -2.5
    w[32:64, 3] = w[32:64, 3].abs() + 1
    w[64:96, 4] = -w[64:96, 4].abs() - 1
    w[96:, 5] = 1e-9   # below the scale's floor
    qweight, qzeros, scales = pack.quantize_packed(w, 32)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    z = pack.unpack(qzeros)
    assert [z[0, 0], z[0, 1], z[0, 2], z[1, 3], z[2, 4]] == [0, 0, 15, 0, 15]
    w_hat = pack.dequantize(qweight, qzeros, scales)
    assert torch.equal(w_hat[:32, 0], torch.zeros(32))
    step = scales.float().repeat_interleave(32, 0)
    err = ((w_hat - w).abs() / step)[:, :6]
    assert err.max() <= 0.5 + 1e-2


@pytest.mark.parametrize("make,match", [
    (lambda: QuantizedLinear(100, 64, 32), "input features 100 are not a multiple of group_size=32"),
    (lambda: QuantizedLinear(64, 60, 32), "output features 60 are not a multiple of 8"),
    (lambda: QuantizedLinear(64, 64, 16), "group_size=16 is invalid: allowed: (32, 64, 128)"),
    (lambda: QuantizedExperts(4, 64, 20, 32), "input features 20 are not a multiple"),
    (lambda: QuantConfig(bits=8), "bits=8 is invalid: only 4-bit"),
    (lambda: QuantConfig(bits=True), "bits=True is invalid"),
    (lambda: QuantConfig(group_size=0), "group_size=0 is invalid"),
    (lambda: QuantConfig(group_size=256), "group_size=256 is invalid"),
    (lambda: check_quantizable(ModelConfig(dim=64, num_heads=16, num_kv_heads=1, head_dim=4,
                                           moe=MoEConfig(dim=64, hidden_dim=32)),
                               QuantConfig(group_size=32)),
     "attn.k_proj: output features 4 are not a multiple of 8"),
])
def test_refused_shapes_and_settings(make, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        make()


# ---- calibration -------------------------------------------------------------------------------

def test_experts_without_tokens_are_plain_rtn(monkeypatch):
    """Experts the router never picks warn by name, and hold exactly the round-to-nearest of their
    float weights (gate|up after the layer's shared input scale, which the norm absorbs)."""
    model = tiny_model(score_func="sigmoid", bias_update_rate=1e-3)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.bias[[2, 5]] = -1e4
    source = copy.deepcopy(model)
    shared_scales = []   # the gate|up scale of each MoE layer: the search over every expert
    search = calibrate.search_scale

    def recording(stat, pairs, group_size, *a):
        out = search(stat, pairs, group_size, *a)
        if len(pairs) > 1:
            shared_scales.append(out[0])
        return out
    monkeypatch.setattr(calibrate, "search_scale", recording)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate.quantize_model(model, torch.randint(0, 256, (4, 16)), QuantConfig(group_size=64),
                                 progress=False)
    named = sorted(str(w.message).split(" received")[0] for w in caught)
    assert named == [f"layers.{i}.ffn.experts[{e}]" for i in range(4) for e in (2, 5)]
    for moe, float_moe, s in zip(model.moe_layers(), source.moe_layers(), shared_scales):
        for e in (2, 5):
            want_gu = pack.quantize_packed(float_moe.experts.gate_up[e].detach() * s[:, None], 64)
            want_dn = pack.quantize_packed(float_moe.experts.down[e].detach(), 64)
            for weight, want in ((moe.experts.gate_up, want_gu), (moe.experts.down, want_dn)):
                for buf, t in zip(weight.packed, want):
                    assert torch.equal(buf[e], t)


@pytest.mark.parametrize("tokens,moe_kw,num_warnings", [
    ((1, 1), {}, 4 * 6),                            # one token: two experts see exactly one row
    ((2, 16), dict(num_experts=4, top_k=4), 0),     # K == E: every expert sees every token
])
def test_calibration_corners(tokens, moe_kw, num_warnings):
    model = tiny_model(**moe_kw)
    source = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calibrate.quantize_model(model, torch.randint(0, 256, tokens), QuantConfig(group_size=32),
                                 progress=False)
    assert len(caught) == num_warnings
    for m in model.modules():
        if isinstance(m, Int4Weight):
            assert torch.isfinite(m.scales).all() and (m.scales > 0).all()
    # a random model's logits move a lot under int4 (routing flips): judge against plain rounding
    rtn = copy.deepcopy(source)
    with torch.no_grad():
        for layer in rtn.layers:
            for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.o_proj):
                lin.weight.copy_(pack.fake_quantize(lin.weight.T, 32).T)
            for w in (layer.ffn.experts.gate_up, layer.ffn.experts.down):
                w.copy_(pack.fake_quantize(w, 32))
        x = torch.randint(0, 256, (2, 24))
        assert rel_err(model(x)[0], source(x)[0]) < 1.5 * rel_err(rtn(x)[0], source(x)[0])


def _hf_float_model(arch, path):
    hf_model(arch).save_pretrained(path)
    return from_hf(path).eval()


def _keep_float(monkeypatch):
    """quantize_model with its scales folded and searched but the float modules kept: the model
    must then compute what it computed before."""
    for name, attrs in (("_attention", ("q_proj", "k_proj", "v_proj", "o_proj")), ("_experts", ())):
        step = getattr(calibrate, name)

        def keep(layer, cap, gs, where, step=step, attrs=attrs):
            parent = layer.attn if attrs else layer.ffn
            kept = {a: getattr(parent, a) for a in attrs or ("experts",)}
            step(layer, cap, gs, where)
            for a, module in kept.items():
                setattr(parent, a, module)
        monkeypatch.setattr(calibrate, name, keep)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_scale_folding_keeps_the_float_model(arch, tmp_path, monkeypatch):
    """Qwen2-MoE (qkv biases, a shared expert and its gate, GQA) and DeepSeek-V3 (MLA, a dense
    first layer, sigmoid group-limited routing with a bias, a shared expert): folding every AWQ
    scale into the op before leaves the float model's logits as they were."""
    model = _hf_float_model(arch, tmp_path)
    source = copy.deepcopy(model)
    _keep_float(monkeypatch)
    calibrate.quantize_model(model, torch.randint(0, 97, (4, 16)), QuantConfig(group_size=32),
                             progress=False)
    assert not any(isinstance(m, Int4Weight) for m in model.modules())
    assert not torch.equal(model.layers[-1].ffn_norm.weight, source.layers[-1].ffn_norm.weight)
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert rel_err(model(x)[0], source(x)[0]) < 1e-5


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_what_is_quantized_and_hf_round_trip(arch, tmp_path):
    """Routed experts and GQA projections become int4; the router, embeddings, norms, LM head,
    dense layers, shared experts (and gate) and MLA projections stay float; to_hf -> from_hf
    gives back the same packed tensors, bit for bit, and the same logits."""
    model = _hf_float_model(arch, tmp_path / "src")
    source = copy.deepcopy(model)
    calibrate.quantize_model(model, torch.randint(0, 97, (4, 16)), QuantConfig(group_size=32),
                             progress=False)
    gqa = model.cfg.attention == "gqa"
    for layer, float_layer in zip(model.layers, source.layers):
        assert isinstance(layer.attn.o_proj, QuantizedLinear) == gqa
        if not gqa:   # MLA is left alone, weights and all
            assert all(torch.equal(a, b) for a, b in zip(layer.attn.state_dict().values(),
                                                         float_layer.attn.state_dict().values()))
        if not layer.is_moe:
            assert all(torch.equal(a, b) for a, b in zip(layer.ffn.state_dict().values(),
                                                         float_layer.ffn.state_dict().values()))
            continue
        moe = layer.ffn
        assert isinstance(moe.experts, QuantizedExperts)
        assert moe.router.weight.dtype == torch.float32 and isinstance(moe.shared.up_proj,
                                                                       torch.nn.Linear)
        assert (moe.shared_gate is not None) == (arch == "qwen2_moe")
    for name in ("embed.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[name], source.state_dict()[name])
    if gqa:
        assert model.layers[0].attn.q_proj.bias is not None
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        logits = model(x)[0]
        assert rel_err(logits, source(x)[0]) < 0.2
    to_hf(model, tmp_path / "hf")
    keep = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    assert "shared_expert" in keep and ("model.layers.0.mlp." in keep) == (not gqa)
    again = from_hf(tmp_path / "hf").eval()
    state, back = model.state_dict(), again.state_dict()
    assert state.keys() == back.keys()
    assert all(torch.equal(state[k], back[k]) and state[k].dtype == back[k].dtype for k in state)
    with torch.no_grad():
        assert torch.equal(again(x)[0], logits)


# ---- AutoAWQ checkpoints -----------------------------------------------------------------------

def error_line(capsys) -> str:
    """What a refused command printed: one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("dropless: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def awq_mixtral(tmp_path_factory):
    """(float source, AutoAWQ copy, float copy holding the dequantized weights) of a Mixtral."""
    root = tmp_path_factory.mktemp("awq")
    hf_model("mixtral").save_pretrained(root / "src")
    return (root / "src", *write_awq(root / "src", root))


def edited(awq_dir, dst, config=None, tensors=None):
    """A copy of an AutoAWQ directory with quantization_config fields and tensors changed."""
    shutil.copytree(awq_dir, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("config,match", [
    ({"group_size": 0}, "quantization_config.group_size=0 (allowed: 32, 64, 128)"),
    ({"group_size": 16}, "quantization_config.group_size=16"),
    ({"group_size": "abc"}, "quantization_config.group_size='abc'"),
    ({"zero_point": False}, "quantization_config.zero_point=False (must be True)"),
    ({"version": "gemv"}, "quantization_config.version='gemv' (only the 'gemm' packing is read)"),
    ({"version": "exllama"}, "quantization_config.version='exllama'"),
    ({"bits": 3}, "quantization_config.bits=3 (must be 4)"),
])
def test_awq_config_refused_by_name(awq_mixtral, tmp_path, capsys, config, match):
    awq_dir = edited(awq_mixtral[1], tmp_path / "awq", config)
    assert main(["convert", "--from-hf", str(awq_dir), str(tmp_path / "run")]) == 1
    assert match in error_line(capsys)
    assert not (tmp_path / "run").exists()


W1 = "model.layers.0.block_sparse_moe.experts.1.w1"
BAD_TENSORS = {   # edit of the file's tensors -> what the error names
    "qweight as float bits": (lambda s: s.update({f"{W1}.qweight": s[f"{W1}.qweight"].view(
        torch.float32)}), f"{W1} AWQ dtypes qweight F32"),
    "qzeros int64": (lambda s: s.update({f"{W1}.qzeros": s[f"{W1}.qzeros"].long()}),
                     "qzeros I64"),
    "scales int32": (lambda s: s.update({f"{W1}.scales": s[f"{W1}.scales"].int()}),
                     "scales I32"),
    "qzeros short": (lambda s: s.update({f"{W1}.qzeros": s[f"{W1}.qzeros"][:1]}),
                     f"{W1}: AWQ shapes qweight [64, 4], qzeros [1, 4], scales [2, 32]"),
    "scales wide": (lambda s: s.update({f"{W1}.scales": s[f"{W1}.scales"].repeat(1, 2)}),
                    "scales [2, 64] do not fit group_size=32"),
    "qweight of another layout": (lambda s: s.update({f"{W1}.qweight": s[f"{W1}.qweight"].reshape(
        32, 8)}), "qweight [32, 8]"),
    "qzeros missing": (lambda s: s.pop(f"{W1}.qzeros"), f"AWQ tensors missing: {W1}.qzeros"),
    "a float weight beside the packed one": (lambda s: s.update({f"{W1}.weight": torch.zeros(
        32, 64)}), f"{W1} is stored twice, as {W1}.weight and as AWQ qweight/qzeros/scales"),
    "a stray scales": (lambda s: s.update({"model.layers.0.block_sparse_moe.gate.scales":
                                           torch.ones(2, 4, dtype=torch.float16)}),
                       "1 unexpected: model.layers.0.block_sparse_moe.gate.scales"),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_malformed_awq_tensors_named(awq_mixtral, tmp_path, case):
    """Each error names the tensor and the file holding it (the shape and missing-part errors
    named no file, the dtype error only its base name)."""
    edit, match = BAD_TENSORS[case]
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")) as err:
        from_hf(edited(awq_mixtral[1], tmp_path / "awq", tensors=edit))
    assert str(err.value).startswith(str(tmp_path / "awq"))


def test_modules_to_not_convert(awq_mixtral, tmp_path):
    """An AutoAWQ file that keeps layer 1's attention float (listed in modules_to_not_convert):
    those weights load exactly; the attention of the other layer is dequantized to float with
    them (packed attention is all or nothing); the experts stay packed; logits match
    transformers on the same weights."""
    src, awq_dir, ref_dir = awq_mixtral
    source = load_file(src / "model.safetensors")
    attn = [k for k in source if k.startswith("model.layers.1.self_attn.") and "proj" in k]

    def keep_float(state):
        for k in attn:
            for part in ("qweight", "qzeros", "scales"):
                del state[k.replace(".weight", f".{part}")]
            state[k] = source[k]
    mixed = edited(awq_dir, tmp_path / "awq", {"modules_to_not_convert": [
        "gate", "model.layers.1.self_attn"]}, keep_float)
    ref = edited(ref_dir, tmp_path / "ref", tensors=lambda s: s.update(
        {k: source[k] for k in attn}))
    model = from_hf(mixed).eval()
    assert isinstance(model.layers[0].ffn.experts, QuantizedExperts)
    assert all(isinstance(layer.attn.q_proj, torch.nn.Linear) for layer in model.layers)
    assert torch.equal(model.layers[1].attn.q_proj.weight,
                       source["model.layers.1.self_attn.q_proj.weight"])
    want = transformers.AutoModelForCausalLM.from_pretrained(ref, attn_implementation="eager")
    x = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert rel_err(model(x)[0], want.eval().float()(x).logits) < 1e-4
