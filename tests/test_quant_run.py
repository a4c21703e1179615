"""`dropless quantize` and the quantized run directory at their edges: every group size then
`eval`, flags and shapes refused in one line, a dense model, non-finite weights, an --out that
exists, a failure or Ctrl-C mid-way (no output left), quantized sources; `generate` against the
dequantized float twin and `convert --to-hf` / `--from-hf` bit for bit."""

import copy
import dataclasses
import json
import warnings

import pytest
import torch

from dropless import PRESETS, ModelConfig, MoEConfig, Transformer
from dropless.checkpoint import config_to_dict, load_run
from dropless.cli import main
from dropless.errors import DroplessError
from dropless.experts import Experts
from dropless.generate import generate
from dropless.parallel.checkpoint import save
from dropless.quant import calibrate
from dropless.quant.modules import Int4Weight, QuantizedLinear
from dropless.tokenizer import ByteTokenizer
from tests.conftest import rel_err
from tests.test_hf import hf_model
from tests.test_quant_edges import error_line
from tests.test_quant_hf import write_awq


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """The CPU reference path, even when a kernel test switched the interpreter on earlier."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_run(path, cfg, edit=None):
    """A run directory holding a freshly initialised model (after `edit(model)`)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    save(path, 0, model, state={"model_config": config_to_dict(cfg),
                                "tokenizer": ByteTokenizer().to_json()})
    return path


def quantize(src, out, corpus, *flags):
    return main(["quantize", str(src), "--out", str(out), "--calib-data", str(corpus),
                 "--calib-samples", "2", "--calib-seq-len", "16", "--quiet", "--device", "cpu",
                 *flags])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A tiny run trained briefly, and its int4 copy (group 64)."""
    from dropless.config import TrainConfig
    from dropless.train import train

    root = tmp_path_factory.mktemp("edges")
    train(TrainConfig(out=str(root / "run"), data=str(corpus), cache_dir=str(root / "cache"),
                      steps=20, batch_size=8, seq_len=32, warmup=5, eval_every=20,
                      eval_batches=2, ckpt_every=100, log_every=10, sample_tokens=0),
          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # experts without calibration tokens
        assert quantize(root / "run", root / "q64", corpus, "--group-size", "64",
                        "--calib-samples", "4", "--calib-seq-len", "32") == 0
    return root


@pytest.mark.parametrize("group", [32, 128])
def test_group_sizes_then_eval(trained, corpus, group, capsys):
    out = trained / f"q{group}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(trained / "run", out, corpus, "--group-size", str(group)) == 0
    model, _, state = load_run(out)
    assert state["quant"] == {"bits": 4, "group_size": group, "attention": True, "experts": True}
    for m in model.modules():
        if isinstance(m, Int4Weight):
            assert m.qweight.shape[-2] // m.qzeros.shape[-2] == group
    capsys.readouterr()
    ppl = {}
    for name in ("run", f"q{group}", "q64"):
        assert main(["eval", str(trained / name), "--json", "--device", "cpu"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["val_ppl"]
    assert ppl["run"] < ppl[f"q{group}"] < 1.05 * ppl["run"] and ppl["q64"] < 1.05 * ppl["run"]


def test_info_says_a_run_is_quantized(trained, capsys):
    assert main(["info", str(trained / "q64")]) == 0
    assert capsys.readouterr().out.startswith(
        f"{trained / 'q64'}: run directory, int4 AWQ weights (the sizes below are of float")


@pytest.mark.parametrize("flags,match", [
    (["--group-size", "0"], "--group-size 0 is invalid: allowed: (32, 64, 128)"),
    (["--group-size", "256"], "--group-size 256 is invalid"),
    (["--bits", "8"], "--bits 8 is invalid: only 4-bit weights are implemented"),
    (["--calib-seq-len", "513"], "--calib-seq-len 513 is invalid: must be in [1, 512] (the model's "
                                "max_seq_len=512"),
    (["--calib-samples", "-1"], "--calib-samples -1 is invalid"),
])
def test_quantize_flags_refused(trained, corpus, capsys, flags, match):
    assert quantize(trained / "run", trained / "refused", corpus, *flags) == 1
    assert match in error_line(capsys)
    assert not (trained / "refused").exists() and not list(trained.glob(".refused*"))


def test_dims_that_do_not_split_into_groups(tmp_path, corpus, capsys):
    """dim 96: whole groups of 32, not of 64."""
    cfg = ModelConfig(dim=96, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(dim=96, hidden_dim=64, num_experts=4, top_k=2))
    run = make_run(tmp_path / "run", cfg)
    assert quantize(run, tmp_path / "q", corpus, "--group-size", "64") == 1
    assert ("cannot quantize: experts.gate_up: input features 96 are not a multiple of "
            "--group-size 64") in error_line(capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(run, tmp_path / "q", corpus, "--group-size", "32") == 0


def test_dense_model_quantizes_its_attention(tmp_path, corpus, capsys):
    """A model without MoE layers: attention int4, dense feed-forwards float; the summary line
    does not divide by its zero expert bytes."""
    cfg = dataclasses.replace(PRESETS["tiny-dense"], num_layers=2, first_dense_layers=2)
    assert quantize(make_run(tmp_path / "run", cfg), tmp_path / "q", corpus) == 0
    assert "2 layers, experts 0.00 MiB int4" in capsys.readouterr().out
    model, _, _ = load_run(tmp_path / "q")
    assert isinstance(model.layers[0].attn.q_proj, QuantizedLinear)
    assert isinstance(model.layers[0].ffn.up_proj, torch.nn.Linear)


def test_non_finite_source_refused(tmp_path, corpus, capsys):
    def poison(model):
        model.layers[1].ffn.experts.gate_up[3, 0, 0] = float("nan")
        model.layers[0].attn.q_proj.weight[0, 0] = float("inf")
    run = make_run(tmp_path / "run", PRESETS["tiny"], poison)
    assert quantize(run, tmp_path / "q", corpus) == 1
    err = error_line(capsys)
    assert "layers.0.attn.q_proj.weight" in err and "layers.1.ffn.experts.gate_up" in err
    assert not (tmp_path / "q").exists()


def test_weights_whose_fp16_scales_overflow_refused(tmp_path, corpus, capsys):
    """A group's scale is its range / 15 in fp16: 1e6 would store inf and dequantize to NaN; the
    router and the embeddings stay in float, so theirs do not matter."""
    def blow_up(model):
        model.layers[1].ffn.experts.down[0, 0, 0] = 1e6
        model.layers[0].attn.o_proj.weight[0, 0] = -6e5
        model.layers[0].ffn.router.weight[0, 0] = 1e6
        model.embed.weight[0, 0] = 1e6
    run = make_run(tmp_path / "run", PRESETS["tiny"], blow_up)
    assert quantize(run, tmp_path / "q", corpus) == 1
    err = error_line(capsys)
    assert "over 491,280 in magnitude" in err
    names = err.strip().rpartition(": ")[2].split(", ")
    assert names == ["layers.0.attn.o_proj.weight", "layers.1.ffn.experts.down"]
    assert not (tmp_path / "q").exists()


def test_out_that_exists(trained, corpus, capsys):
    (trained / "a_file").write_text("keep")
    (trained / "full").mkdir()
    (trained / "full" / "x").write_text("keep")
    for out in (trained / "a_file", trained / "full"):
        assert quantize(trained / "run", out, corpus) == 1
        assert "exists and is not an empty directory" in error_line(capsys)
    assert (trained / "a_file").read_text() == "keep"
    assert [p.name for p in (trained / "full").iterdir()] == ["x"]
    (trained / "empty").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(trained / "run", trained / "empty", corpus) == 0
    assert "quant" in load_run(trained / "empty")[2]


@pytest.mark.parametrize("where,error,rc", [("save", OSError(28, "No space left on device"), 1),
                                            ("quantize_model", KeyboardInterrupt(), 130)])
def test_failure_leaves_no_output(trained, corpus, capsys, monkeypatch, where, error, rc):
    import dropless.parallel.checkpoint as dcp_checkpoint

    module = dcp_checkpoint if where == "save" else calibrate
    real = getattr(module, where)

    def fail(*args, **kw):
        real(*args, **kw)   # the work is done (a checkpoint half written), then it breaks
        raise error
    monkeypatch.setattr(module, where, fail)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert quantize(trained / "run", trained / "broken", corpus) == rc
    assert capsys.readouterr().err.count("\n") == 1
    assert not (trained / "broken").exists() and not list(trained.glob(".broken*"))


def test_quantized_sources_refused(trained, tmp_path, corpus, capsys):
    assert quantize(trained / "q64", tmp_path / "qq", corpus) == 1
    assert "is already quantized" in error_line(capsys)
    hf_model("mixtral").save_pretrained(tmp_path / "src")
    awq_dir, _ = write_awq(tmp_path / "src", tmp_path)
    capsys.readouterr()
    assert quantize(awq_dir, tmp_path / "qq", corpus) == 1
    assert f"{awq_dir} is already quantized" in error_line(capsys)
    assert not (tmp_path / "qq").exists()


def dequantized(model):
    """The float twin of a quantized model: every packed module replaced by a float one holding
    its dequantized weights."""
    model = copy.deepcopy(model)
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            q = getattr(layer.attn, name)
            lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            lin.weight.data = q.weight.dequantize().T.contiguous()
            if q.bias is not None:
                lin.bias.data = q.bias.data.clone()
            setattr(layer.attn, name, lin)
        if layer.is_moe:
            q, m = layer.ffn.experts, layer.ffn.cfg
            experts = Experts(m.num_experts, m.dim, m.hidden_dim)
            experts.gate_up.data, experts.down.data = q.gate_up.dequantize(), q.down.dequantize()
            layer.ffn.experts = experts
    return model


def test_generate_equals_dequantized_twin(trained, capsys):
    model, tok, _ = load_run(trained / "q64")
    twin = dequantized(model)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert rel_err(model(x)[0], twin(x)[0]) < 1e-5
    prompts = [tok.encode(p).tolist() for p in ("def ", "class Foo:\n    ")]
    tokens = generate(model, prompts, 12, temperature=0)
    assert tokens == generate(twin, prompts, 12, temperature=0)
    capsys.readouterr()
    assert main(["generate", str(trained / "q64"), "--max-new-tokens", "12", "--temperature",
                 "0"]) == 0
    assert capsys.readouterr().out == "def " + tok.decode(tokens[0]) + "\n"


def test_convert_round_trip_is_bit_identical(trained, tmp_path):
    """convert --to-hf of a quantized run, then --from-hf: the same state, bit for bit."""
    assert main(["convert", "--to-hf", str(trained / "q64"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    (a, _, sa), (b, _, sb) = load_run(trained / "q64"), load_run(tmp_path / "back")
    assert sa["quant"] == sb["quant"]
    state, back = a.state_dict(), b.state_dict()
    assert state.keys() == back.keys()
    assert all(torch.equal(state[k], back[k]) and state[k].dtype == back[k].dtype for k in state)
    assert b.lm_head.weight is b.embed.weight   # tied, as in the source
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])


def test_a_run_is_read_straight_into_the_working_dtype(trained, monkeypatch):
    """Where the fp32 model would take over half the GPU, quantize works in bf16: the checkpoint
    then loads into bf16 tensors (a 30B run's fp32 weights would not fit an H100 first)."""
    from dropless import checkpoint
    from dropless.quant import run

    asked, real = [], checkpoint.load_run
    monkeypatch.setattr(run, "work_dtype", lambda cfg, device: torch.bfloat16)
    monkeypatch.setattr(checkpoint, "load_run",
                        lambda *a, **k: asked.append(a[2:] + tuple(k.values())) or real(*a, **k))
    model = run.load_source(trained / "run", torch.device("cpu"))[0]
    assert asked == [(torch.bfloat16,)]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(DroplessError, match="already quantized"):
        run.load_source(trained / "q64", torch.device("cpu"))


@pytest.mark.parametrize("context,expected", [(64, 64), (1024, 512)])
def test_calib_seq_len_left_out_fits_the_models_context(tmp_path, corpus, capsys, monkeypatch,
                                                        context, expected):
    """Left out, --calib-seq-len is 512 or the model's max_seq_len where that is shorter: a run
    with a 64-token context was refused for "--calib-seq-len 512", a flag nobody passed. Given,
    a value over the context is still refused, by name."""
    cfg = ModelConfig(dim=128, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=context,
                      moe=MoEConfig(dim=128, hidden_dim=128, num_experts=4, top_k=2))
    run = make_run(tmp_path / "run", cfg)
    shapes, real = [], calibrate.quantize_model

    def spy(model, tokens, *args, **kwargs):
        shapes.append(tuple(tokens.shape))
        return real(model, tokens, *args, **kwargs)

    monkeypatch.setattr(calibrate, "quantize_model", spy)
    argv = ["quantize", str(run), "--calib-data", str(corpus), "--calib-samples", "2", "--quiet",
            "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # experts without calibration tokens
        assert main([*argv, "--out", str(tmp_path / "q")]) == 0, capsys.readouterr().err
    assert shapes == [(2, expected)]
    assert main([*argv, "--out", str(tmp_path / "q2"), "--calib-seq-len", str(context + 1)]) == 1
    assert (f"--calib-seq-len {context + 1} is invalid: must be in [1, {context}] (the model's "
            f"max_seq_len={context}") in error_line(capsys)
    assert shapes == [(2, expected)] and not (tmp_path / "q2").exists()
