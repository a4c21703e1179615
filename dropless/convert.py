"""Hugging Face model directories as a whole (with their tokenizer.json), and `dropless convert`
between them and dropless run directories. The tensors themselves are `dropless.hf`'s."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from dropless.checkpoint import config_to_dict, load_run
from dropless.errors import DroplessError
from dropless.files import atomic_dir, fsync_dir, read_small_text, temp_beside, write_atomic
from dropless import hf
from dropless.hf import from_hf, read_hf_config, to_hf
from dropless.hf_config import config_from_hf
from dropless.model import Transformer
from dropless.parallel.checkpoint import save
from dropless.tokenizer import tokenizer_from_json


def hf_dir_header(path):
    """-> (ModelConfig, the directory's tokenizer.json text or None), both checked (the
    tokenizer's ids must fit the model's vocabulary); no weight is read."""
    path = Path(path)
    cfg = config_from_hf(read_hf_config(path), str(path / "config.json"))
    tokenizer = path / "tokenizer.json"
    text = None
    if tokenizer.exists():
        try:
            text = read_small_text(tokenizer, path)
            tok = tokenizer_from_json(text)
        except ValueError as err:
            raise ValueError(f"{tokenizer}: {err}") from None
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{tokenizer} has {tok.vocab_size} tokens but config.json has "
                             f"vocab_size={cfg.vocab_size}: the tokenizer must fit the model")
    return cfg, text


def load_hf_dir(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """-> (model in eval mode, the directory's tokenizer.json text or None). The config and the
    tokenizer are checked (hf_dir_header) before any weight is read."""
    text = hf_dir_header(path)[1]
    return from_hf(path, dtype, device).eval(), text


def save_hf_dir(model: Transformer, path, tokenizer_json: str, model_type: str | None = None) -> None:
    """to_hf plus tokenizer.json, so the directory is self-contained (dropless's raw-byte tokenizer
    is written as the equivalent byte-level `tokenizers` one: ids 0..255 are the bytes)."""
    to_hf(model, path, model_type)
    write_atomic(Path(path) / "tokenizer.json",
                 tokenizer_from_json(tokenizer_json).to_hf_json().encode())


def convert_from_hf(hf_dir: str | Path, out: str | Path) -> None:
    """HF model directory -> dropless run directory (model, config and tokenizer; `generate` reads it)."""
    model, tokenizer_json = load_hf_dir(hf_dir)
    if tokenizer_json is None:
        raise ValueError("the HF directory has no tokenizer.json; a run directory needs one")
    state = {"model_config": config_to_dict(model.cfg), "tokenizer": tokenizer_json}
    qcfg = _quant_config(model)
    if qcfg is not None:   # an AutoAWQ directory: load_run must swap the same packed modules in
        state["quant"] = asdict(qcfg)
    from dropless.serve.text import copy_chat_files

    with atomic_dir(out) as tmp:   # a failed save leaves no half-made run directory in OUT
        save(tmp, 0, model, state=state)
        copy_chat_files(hf_dir, tmp, model.cfg.vocab_size, tokenizer_from_json(tokenizer_json))


def _quant_config(model: Transformer):
    """The QuantConfig of the packed modules from_hf kept (AutoAWQ), as `dropless quantize` saves
    it; None for a float model."""
    from dropless.quant.modules import Int4Weight, QuantConfig, QuantizedExperts, QuantizedLinear

    weights = [m for m in model.modules() if isinstance(m, Int4Weight)]
    if not weights:
        return None
    w = weights[0]
    return QuantConfig(group_size=w.qweight.shape[-2] // w.qzeros.shape[-2],
                       attention=any(isinstance(m, QuantizedLinear) for m in model.modules()),
                       experts=any(isinstance(m, QuantizedExperts) for m in model.modules()))


def convert_to_hf(run_dir: str | Path, out: str | Path, model_type: str | None = None,
                  dtype: torch.dtype | None = None) -> None:
    """dropless run directory -> HF model directory that `from_pretrained` loads, its weights in
    `dtype` (default: float32, as saved; read straight into it). `out` (absent or an empty
    directory) appears whole or not at all: config.json, the weights and the tokenizer are
    written into a temp directory beside it, renamed into place at the end, so an interrupted
    convert leaves no directory that looks like a model with half its weights."""
    from dropless.serve.text import copy_chat_files

    model, tokenizer, _ = load_run(run_dir, "cpu", dtype)
    with atomic_dir(out) as tmp:
        save_hf_dir(model, tmp, tokenizer.to_json(), model_type)
        copy_chat_files(run_dir, tmp, model.cfg.vocab_size, tokenizer)


def convert_to_safetensors(run_dir: str | Path, out: str | Path,
                           dtype: torch.dtype | None = None) -> int:
    """`dropless convert RUN_DIR --to-safetensors OUT`: the run's latest checkpoint (from any mesh)
    as one safetensors file in `dtype` (default: float32, as saved), every expert present once
    and tied weights under each name. Returns the number of tensors."""
    from safetensors import SafetensorError

    model = load_run(run_dir, "cpu", dtype)[0]
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():   # a tied weight's second name gets its own copy
        tensors[k] = v.detach().contiguous()
        if tensors[k].data_ptr() in seen:
            tensors[k] = tensors[k].clone()
        seen.add(tensors[k].data_ptr())
    # safetensors writes a temp file beside the path given, then renames it: killed mid-write,
    # that file (the model's size) stayed for good. Given a path in a temp directory named for
    # `out`, what a kill leaves is that directory, which the next write to `out` removes.
    out = Path(os.path.abspath(out))
    tmp = temp_beside(out, hidden=True)
    tmp.mkdir()
    try:
        hf.save_safetensors(tensors, tmp / out.name)   # looked up at the call: tests replace it
        os.replace(tmp / out.name, out)
    except SafetensorError as e:   # its I/O errors are not OSErrors: a full disk, ...
        raise DroplessError(f"{out}: cannot write ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out.parent)
    return len(tensors)
