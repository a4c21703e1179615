"""`dropless train --init SRC` (dropless.finetune): a run that starts from a run's or a Hugging Face
directory's weights and tokenizer; its architecture is the source's, its optimizer and schedule its
own (lr 2e-5 unless given); it resumes from its own checkpoint; wrong combinations and sources that
cannot be trained are one line."""

import json
import warnings

import pytest
import torch

from dropless import cli
from dropless.checkpoint import load_model_dir, load_run
from dropless.generate import greedy_recompute
from tests.test_quant_run import quantize


def _train(capsys, src, out, corpus, *flags) -> int:
    code = cli.main(["train", "--init", str(src), "--out", str(out), "--data", str(corpus),
                     "--cache-dir", str(out.parent / "cache"), "--batch-size", "2",
                     "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
                     "--sample-tokens", "0", "--quiet", *flags])
    capsys.readouterr()
    return code


def _weights(run) -> dict:
    return load_run(run)[0].state_dict()


@pytest.mark.parametrize("hf", [False, True])
def test_starts_from_the_source(trained_run, tmp_path, corpus, capsys, hf):
    """At a learning rate of 1e-12 one step leaves the source's weights as they were: they were
    loaded, not initialised; the model config (vocabulary included) and tokenizer are the
    source's, the context at least --seq-len."""
    src = trained_run
    if hf:
        src = tmp_path / "hf"
        assert cli.main(["convert", "--to-hf", str(trained_run), str(src)]) == 0
    out = tmp_path / "ft"
    assert _train(capsys, src, out, corpus, "--steps", "1", "--lr", "1e-12", "--warmup", "0",
                  "--seq-len", "300") == 0
    before, after = _weights(trained_run), _weights(out)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-8)
    saved, source = load_run(out)[2], load_run(trained_run)[2]
    assert saved["model_config"]["vocab_size"] == source["model_config"]["vocab_size"]
    assert saved["model_config"]["max_seq_len"] == max(300, source["model_config"]["max_seq_len"])
    assert saved["train_config"]["init"] == str(src.resolve())
    assert json.loads(saved["tokenizer"]) == json.loads(load_model_dir(src)[1].to_json())


def test_defaults_resume_and_trains(trained_run, tmp_path, corpus, capsys):
    out = tmp_path / "ft"
    assert _train(capsys, trained_run, out, corpus, "--steps", "2", "--lr", "1e-3") == 0
    run = load_run(out)[2]
    assert run["step"] == 2 and run["train_config"]["lr"] == 1e-3
    changed = [k for k, v in _weights(out).items() if not torch.equal(v, _weights(trained_run)[k])]
    assert changed   # it trained
    # resumed: the architecture from its own checkpoint, the source not needed any more
    assert cli.main(["train", "--resume", str(out), "--steps", "3", "--quiet"]) == 0
    assert load_run(out)[2]["step"] == 3
    other = tmp_path / "ft2"
    assert _train(capsys, trained_run, other, corpus, "--steps", "1") == 0
    assert load_run(other)[2]["train_config"]["lr"] == 2e-5   # fine-tuning's default


@pytest.mark.parametrize("flags, message", [
    (["--preset", "small"], "--init takes the model and its tokenizer from "),
    (["--tokenizer", "bpe", "--vocab", "300"], "leave out --tokenizer --vocab"),
])
def test_flags_that_do_not_apply(trained_run, tmp_path, corpus, capsys, flags, message):
    code = cli.main(["train", "--init", str(trained_run), "--out", str(tmp_path / "x"),
                     "--data", str(corpus), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_sources_that_cannot_be_trained(trained_run, tmp_path, corpus, capsys):
    assert cli.main(["train", "--init", str(tmp_path / "none"), "--out", str(tmp_path / "x"),
                     "--data", str(corpus), "--quiet"]) == 1
    assert "no such run directory" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # experts without calibration tokens
        assert quantize(trained_run, tmp_path / "q", corpus, "--group-size", "32") == 0
    capsys.readouterr()
    assert cli.main(["train", "--init", str(tmp_path / "q"), "--out", str(tmp_path / "y"),
                     "--data", str(corpus), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds a quantized model (packed int4 weights): it cannot be trained" in err, err


def test_eval_and_generate_read_the_run(trained_run, tmp_path, corpus, capsys):
    out = tmp_path / "ft"
    assert _train(capsys, trained_run, out, corpus, "--steps", "1") == 0
    assert cli.main(["eval", str(out), "--json"]) == 0
    # the same validation windows as the run's own evaluation at its last step
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(recorded, rel=1e-5)
    assert cli.main(["generate", str(out), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    model, tok = load_model_dir(out)
    greedy = greedy_recompute(model, tok.encode("def ").tolist(), 3)
    assert capsys.readouterr().out == "def " + tok.decode(greedy, continuation=True) + "\n"


def test_the_source_chat_files_go_with_the_run(trained_run, tmp_path, corpus, capsys):
    """A fine-tuned instruct model stops and chats as its source: the source's EOS ids and chat
    template are written into the run, where generate --chat and serve read them."""
    from dropless.serve.text import chat_metadata

    hf = tmp_path / "hf"
    assert cli.main(["convert", "--to-hf", str(trained_run), str(hf)]) == 0
    template = "<u>{{ messages[0]['content'] }}</u><a>"
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    out = tmp_path / "ft"
    assert _train(capsys, hf, out, corpus, "--steps", "1") == 0
    source, tuned = (chat_metadata(d, 256, load_model_dir(d)[1]) for d in (hf, out))
    assert tuned == source and tuned[:2] == ((7, 9), template)
    plain = tmp_path / "ft-plain"   # a source without them: none written
    assert _train(capsys, trained_run, plain, corpus, "--steps", "1") == 0
    assert not (plain / "tokenizer_config.json").exists()
    assert not (plain / "generation_config.json").exists()


def test_the_source_tensors_become_the_model(monkeypatch):
    """take_model builds on the meta device and assigns the source's tensors (one host copy, not
    two); tied embeddings stay one Parameter; the RoPE tables are rebuilt when the model moves."""
    from dataclasses import replace

    from dropless.config import PRESETS
    from dropless.finetune import Source
    from dropless.model import Transformer

    cfg = PRESETS["tiny"]
    assert cfg.tie_embeddings
    torch.manual_seed(0)
    built = Transformer(cfg)
    weights = built.state_dict()
    monkeypatch.setattr(Source, "read_weights", lambda self: weights)
    source = Source("src", cfg, None, ((), None, {}))
    model = source.take_model(replace(cfg, max_seq_len=2 * cfg.max_seq_len)).to("cpu")
    assert model.lm_head.weight is model.embed.weight
    for name, p in model.named_parameters():
        assert p.requires_grad and p.data_ptr() == weights[name].data_ptr(), name
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    torch.testing.assert_close(model(x)[0], built(x)[0], rtol=0, atol=0)
    assert model.rope_cos.shape[0] == 2 * built.rope_cos.shape[0]
    torch.testing.assert_close(model.rope_cos[:built.rope_cos.shape[0]], built.rope_cos)


@pytest.mark.parametrize("kind", ["run", "hf"])
def test_the_source_is_read_without_its_weights(trained_run, tmp_path, monkeypatch, kind):
    """load_source (every rank under torchrun) reads the config, tokenizer and chat files only;
    the weights are read when a model takes them (rank 0)."""
    from dropless import checkpoint, hf
    from dropless.convert import save_hf_dir
    from dropless.finetune import load_source

    model, tok, _ = load_run(trained_run)
    src = trained_run
    if kind == "hf":
        src = tmp_path / "hf"
        save_hf_dir(model, src, tok.to_json())
    expected = load_model_dir(src)[0]   # an HF directory's config differs in its defaults

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")
    for module, name in ((checkpoint, "load_run"), (checkpoint, "load_model_dir"),
                         (hf, "from_hf"), (checkpoint, "load")):
        monkeypatch.setattr(module, name, refuse)
    source = load_source(str(src))
    assert source.cfg == expected.cfg
    assert list(source.tokenizer.encode("def f")) == list(tok.encode("def f"))
    monkeypatch.undo()
    weights = source.read_weights()
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=0)


def test_a_bf16_hf_source_is_read_as_bf16_and_trained_in_fp32(trained_run, tmp_path, corpus,
                                                               capsys):
    """A Hugging Face source stored in bf16 is held in bf16 on the host (exact, half the bytes);
    the run's parameters are fp32 (the default precision) and equal to it."""
    from dropless.convert import save_hf_dir
    from dropless.finetune import load_source

    model, tok, _ = load_run(trained_run)
    model = model.to(torch.bfloat16)
    src = tmp_path / "hf16"
    save_hf_dir(model, src, tok.to_json())
    assert {t.dtype for t in load_source(str(src)).read_weights().values()} <= {torch.bfloat16,
                                                                          torch.float32}
    assert torch.bfloat16 in {t.dtype for t in load_source(str(src)).read_weights().values()}
    out = tmp_path / "ft"
    assert _train(capsys, src, out, corpus, "--steps", "1", "--lr", "1e-12", "--warmup", "0") == 0
    after = _weights(out)
    for k, v in model.named_parameters():
        assert after[k].dtype == torch.float32, k
        torch.testing.assert_close(after[k], v.float(), rtol=0, atol=1e-8)
