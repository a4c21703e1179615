"""AutoAWQ GEMM checkpoints: from_hf on an AutoAWQ-layout tiny model of every supported
architecture against Hugging Face transformers running the dequantized weights; to_hf writes the
same tensors back; other quantization methods are refused by name."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from dropless import from_hf, to_hf  # noqa: E402
from dropless.quant.modules import QuantizedExperts, QuantizedLinear  # noqa: E402
from dropless.quant.pack import dequantize, quantize_packed  # noqa: E402
from tests.test_hf import ARCHS, hf_model  # noqa: E402

GROUP = 32


def write_awq(src, dst, group=GROUP):
    """Rewrite a saved HF directory as AutoAWQ would: every linear whose shape allows it becomes
    qweight/qzeros/scales (routers and the LM head stay float). Writes the float model with the
    dequantized weights beside it (the transformers reference)."""
    state = load_file(src / "model.safetensors")
    awq, deq = {}, {}
    for key, t in state.items():
        name = key.removesuffix(".weight")
        quantize = (key.endswith("_proj.weight") or key.endswith((".w1.weight", ".w2.weight",
                                                                  ".w3.weight"))) and t.dim() == 2
        if quantize and t.shape[1] % group == 0 and t.shape[0] % 8 == 0:
            packed = quantize_packed(t.T, group)
            awq.update({f"{name}.qweight": packed[0], f"{name}.qzeros": packed[1],
                        f"{name}.scales": packed[2]})
            deq[key] = dequantize(*packed).T.contiguous()
        else:
            awq[key] = deq[key] = t
    cfg = json.loads((src / "config.json").read_text())
    (dst / "ref").mkdir(parents=True)
    (dst / "ref" / "config.json").write_text(json.dumps(cfg))
    save_file(deq, dst / "ref" / "model.safetensors", metadata={"format": "pt"})
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                  "zero_point": True, "version": "gemm",
                                  "modules_to_not_convert": ["gate"]}
    (dst / "awq").mkdir()
    (dst / "awq" / "config.json").write_text(json.dumps(cfg))
    save_file(awq, dst / "awq" / "model.safetensors", metadata={"format": "pt"})
    return dst / "awq", dst / "ref"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_from_hf_awq_matches_transformers_on_dequantized(arch, tmp_path):
    hf_model(arch).save_pretrained(tmp_path / "src")
    awq_dir, ref_dir = write_awq(tmp_path / "src", tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, attn_implementation="eager")
    model = from_hf(awq_dir).eval()
    # experts stay packed; GQA projections too (MLA ones were dequantized into float modules)
    for layer in model.layers:
        if layer.is_moe:
            assert isinstance(layer.ffn.experts, QuantizedExperts)
        assert isinstance(layer.attn.o_proj, QuantizedLinear) == (model.cfg.attention == "gqa")
    tokens = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.eval().float()(tokens).logits
        got, _ = model(tokens)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    # to_hf writes the packed tensors back unchanged, with the AWQ config
    to_hf(model, tmp_path / "out")
    written, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        awq_dir / "model.safetensors")
    for key, t in original.items():
        if key.endswith(("qweight", "qzeros", "scales")) and key in written:
            assert torch.equal(written[key], t), key
    packed_experts = [k for k in written if ".experts." in k and k.endswith(".qweight")]
    assert packed_experts and all(torch.equal(written[k], original[k]) for k in packed_experts)
    qcfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["group_size"] == GROUP
    again = from_hf(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(again(tokens)[0], got, atol=1e-4, rtol=0)


def test_other_quantization_refused(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for q, match in ((dict(quant_method="gptq", bits=4), "quant_method='gptq'"),
                     (dict(quant_method="awq", bits=4, version="gemv"), "version='gemv'"),
                     (dict(quant_method="awq", bits=8), "bits=8")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": q}))
        with pytest.raises(ValueError, match=match):
            from_hf(tmp_path)
