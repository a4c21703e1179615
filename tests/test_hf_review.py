"""Hugging Face directories as a user meets them, without transformers (but for its config
defaults): malformed files, tokenizers that do not cover the model's vocabulary, models that no HF
architecture can hold, fields a config.json leaves out."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import hub_cache_snapshot, run_out_of_space, subprocess_env
from dropless import Transformer, from_hf, get_preset, to_hf
from dropless.cli import main
from dropless.convert import save_hf_dir
from dropless.tokenizer import ByteTokenizer, tokenizer_from_json, train_bpe


def hf_dir(path, tokenizer_json=None, **cfg_kw):
    """A small HF directory written by dropless (with a tokenizer.json), and its model."""
    cfg = dataclasses.replace(get_preset("tiny"), num_layers=2, max_seq_len=64, **cfg_kw)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_hf_dir(model, path, tokenizer_json or ByteTokenizer().to_json())
    return model


def chat_hf_dir(path):
    """hf_dir with the chat files that convert, quantize and train --init copy to their outputs."""
    hf_dir(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))


def edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **fields}))


def fails_in_one_line(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dropless: error: ") and message in err, err


@pytest.mark.parametrize("value", ["awq", [1], 4])
def test_quantization_config_that_is_not_an_object_is_one_line(tmp_path, capsys, value):
    hf_dir(tmp_path / "hf")
    edit_config(tmp_path / "hf", quantization_config=value)
    fails_in_one_line(capsys, ["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")],
                      f"quantization_config={value!r} is invalid: must be an object")


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("indexed", [False, True])
def test_weights_that_are_not_regular_files_are_refused_unread(tmp_path, kind, indexed):
    """A FIFO named like a weight file would block the reader forever (it opens it to mmap)."""
    hf_dir(tmp_path)
    name = "model-00001-of-00001.safetensors" if indexed else "model.safetensors"
    (tmp_path / "model.safetensors").unlink()
    if indexed:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": name}}))
    os.mkfifo(tmp_path / name) if kind == "fifo" else (tmp_path / name).mkdir()
    code = "import sys; from dropless import from_hf; from_hf(sys.argv[1])"
    try:   # a child process: safetensors blocks in open() holding the GIL, so no thread returns
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env(),
                             capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("from_hf blocked on a FIFO")
    assert "not a regular file" in run.stderr and name in run.stderr, run.stderr


def test_tokens_outside_the_tokenizer_are_printable(tmp_path):
    """Models pad their vocabulary past the tokenizer's ids (Qwen: 151,936 rows for 151,665
    tokens), and special tokens are stored as their text, not in the byte-level alphabet."""
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50], 300)
    tok.tok.add_special_tokens(["<｜end▁of▁sentence｜>"])
    tok = tokenizer_from_json(tok.to_json())
    special = tok.vocab_size - 1
    assert tok.token_bytes(special) == "<｜end▁of▁sentence｜>".encode()
    assert tok.token_bytes(tok.vocab_size + 5) == b""
    assert tok.decode([tok.encode("def")[0], special, tok.vocab_size]) == "def<｜end▁of▁sentence｜>"


def test_generate_from_an_hf_dir_whose_model_outvocabs_its_tokenizer(tmp_path, capsys):
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50], 300)
    model = hf_dir(tmp_path, tok.to_json(), vocab_size=320, tie_embeddings=False)
    with torch.no_grad():   # every next token is one the tokenizer does not have
        model.lm_head.weight[tok.vocab_size:] *= 1000
    to_hf(model, tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "def \n"


def test_softmax_routing_with_a_selection_bias_is_not_exported(tmp_path):
    """No softmax architecture has a router bias: writing one would silently drop it and route
    differently."""
    tiny = get_preset("tiny")
    cfg = dataclasses.replace(tiny, moe=dataclasses.replace(tiny.moe, bias_update_rate=1e-3))
    model = Transformer(cfg)
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.router.bias.normal_()
    with pytest.raises(ValueError, match="moe.bias_update_rate=0.001"):
        to_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("reshape", [lambda t: t.flatten(), lambda t: t[None]])
def test_awq_qweight_of_the_wrong_rank_names_the_tensor(tmp_path, reshape):
    from safetensors.torch import load_file, save_file
    from dropless.quant.pack import quantize_packed

    hf_dir(tmp_path)
    state, awq = load_file(tmp_path / "model.safetensors"), {}
    for key, t in state.items():
        if key.endswith((".w1.weight", ".w2.weight", ".w3.weight")):
            packed = quantize_packed(t.T, 32)
            awq.update({f"{key[:-len('weight')]}{part}": p
                        for part, p in zip(("qweight", "qzeros", "scales"), packed)})
        else:
            awq[key] = t
    bad = "model.layers.0.block_sparse_moe.experts.0.w1"
    awq[f"{bad}.qweight"] = reshape(awq[f"{bad}.qweight"])
    save_file(awq, tmp_path / "model.safetensors")
    edit_config(tmp_path, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 32,
                                               "zero_point": True, "version": "gemm"})
    with pytest.raises(ValueError, match=f"{bad}: AWQ shapes qweight"):
        from_hf(tmp_path)


def test_an_odd_head_dim_is_refused_before_any_work(tmp_path, capsys):
    """RoPE rotates pairs of dims: an odd head width (weights to match) was read, and then the
    first forward crashed with a traceback."""
    from safetensors.torch import load_file, save_file

    hf_dir(tmp_path)
    edit_config(tmp_path, head_dim=33)
    state = load_file(tmp_path / "model.safetensors")
    for key in [k for k in state if ".self_attn." in k]:
        out, dim = state[key].shape
        state[key] = torch.zeros((dim, 4 * 33) if "o_proj" in key else (out // 32 * 33, dim))
    save_file(state, tmp_path / "model.safetensors")
    fails_in_one_line(capsys, ["generate", str(tmp_path), "--max-new-tokens", "4"],
                      "head_dim=33 is invalid: must be even")


def test_a_head_too_wide_for_its_rope_tables_is_refused_before_any_work(tmp_path, capsys):
    """One head of 2048 dims (weights to match: 8 MB) was loaded, and its RoPE tables sized by
    max_position_embeddings: 65536 positions made 1.7 GB of tables; wider, a RuntimeError."""
    from safetensors.torch import load_file, save_file

    hf_dir(tmp_path, num_heads=1, num_kv_heads=1)
    edit_config(tmp_path, head_dim=2048)
    state = load_file(tmp_path / "model.safetensors")
    for key in [k for k in state if ".self_attn." in k]:
        out, dim = state[key].shape
        state[key] = torch.zeros((dim, 2048) if "o_proj" in key else (2048, dim))
    save_file(state, tmp_path / "model.safetensors")
    fails_in_one_line(capsys, ["generate", str(tmp_path), "--max-new-tokens", "4"],
                      "head_dim=2048 is invalid: must be an integer in [1, 1024]")


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_absent_max_position_embeddings_is_transformers_default(model_type):
    """The context an HF config without max_position_embeddings means is its config class's
    default (Mixtral 131072, the Qwen MoEs 32768), not 4096 for every architecture."""
    transformers = pytest.importorskip("transformers")
    from dropless.hf_config import config_from_hf
    hf = transformers.AutoConfig.for_model(model_type).to_dict()
    default = hf.pop("max_position_embeddings")
    hf.update(num_hidden_layers=2, layer_types=None, first_k_dense_replace=1)
    assert config_from_hf(hf).max_seq_len == default


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_failed_rewrite_of_an_hf_dir_leaves_its_files_whole(tmp_path, name):
    """Converting again into an HF directory on a disk that fills (here: a file size limit)
    truncated config.json or tokenizer.json in place: the previous, working directory destroyed."""
    path = tmp_path / "hf"
    hf_dir(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    setup = ("from dropless import Transformer, convert, get_preset\n"
             "from dropless.tokenizer import ByteTokenizer\n"
             "model = Transformer(get_preset('tiny'))\n"
             "if sys.argv[2] == 'tokenizer.json':   # the weights and config.json are written\n"
             "    convert.to_hf = lambda *args, **kwargs: None")
    act = "convert.save_hf_dir(model, sys.argv[1], ByteTokenizer().to_json())"
    assert run_out_of_space(setup, act, path, name, limit=200) == 3
    assert len(before[name]) > 200   # the limit cuts the file
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before   # no temp file left either


def test_a_tensor_in_two_files_or_not_where_the_index_says_is_refused(tmp_path):
    """from_hf read every file a directory (or its index) names and kept, for a name stored in
    two, whichever came last in sorted order: a stray `zzz.safetensors` holding a zeroed
    embedding replaced the model's, silently, with or without an index saying where it lives."""
    from safetensors.torch import load_file, save_file

    hf_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    zeros = torch.zeros_like(state["model.embed_tokens.weight"])
    save_file({"model.embed_tokens.weight": zeros}, tmp_path / "zzz.safetensors")
    with pytest.raises(ValueError, match=r"1 stored twice: model.embed_tokens.weight \(in "
                                         r"model.safetensors and zzz.safetensors\)"):
        from_hf(tmp_path)
    # the index names model.safetensors for every tensor, but the embedding is only in zzz
    index = {"weight_map": {**{k: "model.safetensors" for k in state},
                            "model.norm.weight": "zzz.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    del state["model.embed_tokens.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"not where the index says: model.embed_tokens.weight "
                                         r"\(in zzz.safetensors, the index says model.safetensors"):
        from_hf(tmp_path)


SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.mark.parametrize("name", SMALL_FILES)
def test_a_small_file_linked_out_of_the_model_directory_is_refused(tmp_path, capsys, name):
    """A model directory's small files were read wherever their symlinks pointed, and the chat
    files copied into convert's output: a link to any file the user can read (a secret) leaked."""
    src, outside = tmp_path / "hf", tmp_path / "elsewhere" / name
    chat_hf_dir(src)
    outside.parent.mkdir()
    (src / name).rename(outside)   # the same bytes, where a link chose
    (src / name).symlink_to(outside)
    fails_in_one_line(capsys, ["convert", "--from-hf", str(src), str(tmp_path / "run")],
                      f"{src / name}: a symlink out of the model directory {src}")
    assert not (tmp_path / "run").exists()


def test_a_hub_cache_snapshot_of_links_into_its_blobs_converts_whole(tmp_path):
    """The hub cache's snapshots/<rev>/* link into ../../blobs/: inside, for the small files as
    for the weights."""
    chat_hf_dir(tmp_path / "src")
    snapshot = hub_cache_snapshot(tmp_path / "src", tmp_path / "models--org--tiny")
    assert main(["convert", "--from-hf", str(snapshot), str(tmp_path / "run")]) == 0
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "src" / name).read_text()
