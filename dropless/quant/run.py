"""The quantized run directory: load a source (run or Hugging Face directory), pick calibration
windows, quantize, and write the result atomically (a temp directory renamed into place).

A quantized run directory is a run directory (one DCP checkpoint, step 0, + `tokenizer.json`) whose
saved state also holds `quant` (the QuantConfig): `checkpoint.load_run` then swaps the packed modules
in before loading. The source's `train_config` is kept, so `dropless eval` finds the same validation split.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from dropless import data
from dropless.errors import DroplessError
from dropless.files import atomic_dir
from dropless.quant.modules import QuantConfig

MAX_WEIGHT = torch.finfo(torch.float16).max * 15 / 2   # over it a group's fp16 scale can overflow
# calibration holds every layer's inputs for all its tokens at once (the scale and clip searches
# read them all): memory grows with --calib-samples x --calib-seq-len, so both are bounded; 16x
# AutoAWQ's 128 x 512
MAX_CALIB_TOKENS = 2**20


def work_dtype(cfg, device: torch.device) -> torch.dtype:
    """float32 (exact folding, exact searches) unless the float32 model would take more than half
    of the GPU: then bf16 weights and activations, the searches still in float32."""
    from dropless.model import Transformer

    if device.type != "cuda":
        return torch.float32
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(cfg).parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.float32 if 4 * params < total / 2 else torch.bfloat16


def load_source(src: str | Path, device: torch.device):
    """-> (model in its working dtype, tokenizer, TrainConfig or None) from a run or HF
    directory."""
    from dropless.checkpoint import load_model_dir, load_run, model_dir_header, saved_train_config
    from dropless.hf import read_hf_config

    src = Path(src)
    hf = (src / "config.json").is_file()
    if hf:   # first: an AutoAWQ directory may have no tokenizer.json, which the header refuses
        try:
            hf_cfg = read_hf_config(src)
        except ValueError as e:
            raise DroplessError(str(e)) from None
        if isinstance(hf_cfg, dict) and hf_cfg.get("quantization_config"):
            raise DroplessError(f"{src} is already quantized")
    cfg, tok, quantized = model_dir_header(src)   # checked; no weight read yet
    if quantized:
        raise DroplessError(f"{src} is already quantized")
    # loaded straight into the working dtype: a 30B run's fp32 weights would not fit an H100
    if hf:
        return load_model_dir(src, device, work_dtype(cfg, device))[0], tok, None
    model, tok, state = load_run(src, device, work_dtype(cfg, device))
    return model, tok, saved_train_config(state)


def calibration_tokens(tok, calib_data: str | None, samples: int, seq_len: int,
                       cache_dir: str | None, chat: tuple | None = None,
                       progress: bool = False) -> torch.Tensor:
    """[samples, seq_len] windows spread evenly over the training split of `calib_data` (default:
    the embedded stdlib corpus), so that validation text is never calibrated on."""
    docs = data.read_documents(calib_data, "--calib-data", chat)
    tokens = data.load_tokens(docs, tok, Path(cache_dir) if cache_dir else data.default_cache_dir(),
                              progress=progress)
    if len(tokens.train) < seq_len + 2:
        raise DroplessError(f"--calib-data: its training split has {len(tokens.train)} tokens, too "
                            f"few for --calib-seq-len {seq_len}")
    return data.eval_batches(tokens.train, samples, seq_len, 1)[0][0]


def quantize_run(src: str | Path, out: str | Path, *, bits: int = 4, group_size: int = 128,
                 calib_data: str | None = None, calib_samples: int = 128,
                 calib_seq_len: int | None = None, device: torch.device | str = "cpu",
                 progress: bool = True, cache_dir: str | None = None) -> dict:
    """Quantize SRC into the run directory OUT; returns a summary (sizes in bytes). Calibration
    tokens are cached in `cache_dir` (default: data.default_cache_dir()), never in SRC's saved
    one: SRC may come from a stranger, and quantizing it must not write where it says.
    `calib_seq_len`: None = 512 tokens, or the model's max_seq_len where that is shorter."""
    from dropless.checkpoint import config_to_dict, model_config_of
    from dropless.serve.text import copy_chat_files
    from dropless.parallel.checkpoint import save
    from dropless.quant.calibrate import quantize_model
    from dropless.quant.modules import QuantizedExperts, check_quantizable

    out = Path(os.path.abspath(out))   # `.` names the directory it is (a temp goes beside it)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DroplessError(f"--out {out}: exists and is not an empty directory")
    for name, value in (("--calib-samples", calib_samples), ("--calib-seq-len", calib_seq_len)):
        if value is not None and value < 1:
            raise DroplessError(f"{name} {value} is invalid: must be >= 1")
    # before any load: the model's context from its header (no weight read), the sequence length
    # checked against it first (--calib-seq-len 100000 blamed the --calib-samples left default)
    context = model_config_of(src)[0].max_seq_len
    longest = min(context, MAX_CALIB_TOKENS)
    if calib_seq_len is None:   # left out: never refused for a short model's context
        calib_seq_len = min(512, longest)
    if calib_seq_len > longest:
        raise DroplessError(f"--calib-seq-len {calib_seq_len} is invalid: must be in [1, "
                            f"{longest}] (the model's max_seq_len={context}; at most "
                            f"{MAX_CALIB_TOKENS:,} calibration tokens)")
    if calib_samples * calib_seq_len > MAX_CALIB_TOKENS:
        raise DroplessError(f"--calib-samples {calib_samples} is invalid: must be in [1, "
                            f"{MAX_CALIB_TOKENS // calib_seq_len}] with --calib-seq-len "
                            f"{calib_seq_len} (at most {MAX_CALIB_TOKENS:,} calibration tokens)")
    try:
        qcfg = QuantConfig(bits=bits, group_size=group_size)
    except ValueError as e:
        raise DroplessError(str(e).replace("bits=", "--bits ").replace("group_size=",
                                                                      "--group-size ")) from None
    device = torch.device(device)
    model, tok, train_config = load_source(src, device)
    # a NaN or inf turns its whole group NaN (the scale is the group's range); sync: per weight
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DroplessError(f"{src}: cannot quantize non-finite (NaN or inf) weights: "
                            f"{', '.join(bad)}")
    # a group's fp16 scale is its range / 15, and the range holds 0
    huge = [name for name, p in model.named_parameters() if name.startswith("layers.")
            and p.dim() >= 2 and "router" not in name and p.abs().max() > MAX_WEIGHT]
    if huge:
        raise DroplessError(f"{src}: cannot quantize weights over {MAX_WEIGHT:,.0f} in magnitude "
                            f"(their int4 groups' fp16 scales overflow): {', '.join(huge)}")
    try:
        check_quantizable(model.cfg, qcfg)
    except ValueError as e:   # the shape errors name group_size=: the flag that set it
        raise DroplessError(f"{src}: cannot quantize: "
                            f"{str(e).replace('group_size=', '--group-size ')}") from None
    from dropless.serve.text import chat_files
    tokens = calibration_tokens(tok, calib_data, calib_samples, calib_seq_len, cache_dir,
                                chat_files(Path(src)), progress)   # conversations: its template
    float_expert_bytes = sum(m.experts.gate_up.numel() + m.experts.down.numel()
                             for m in model.moe_layers()) * 2   # as bf16
    quantize_model(model, tokens, qcfg, progress=progress)
    state = {"model_config": config_to_dict(model.cfg), "quant": asdict(qcfg),
             "tokenizer": tok.to_json()}
    if train_config is not None:
        state["train_config"] = asdict(train_config)
    with atomic_dir(out) as tmp:   # all of it or nothing
        save(tmp, 0, model, state=state)
        (tmp / "tokenizer.json").write_text(tok.to_json())
        copy_chat_files(src, tmp, model.cfg.vocab_size, tok)   # served as the source is
    packed = sum(m.experts.nbytes() for m in model.moe_layers()
                 if isinstance(m.experts, QuantizedExperts))
    return {"out": str(out), "layers": len(model.layers), "expert_bytes_bf16": float_expert_bytes,
            "expert_bytes_int4": packed}
