"""`dropless eval`: validation loss and perplexity of a run directory (quantized or not) or a Hugging
Face directory, on the validation split the run trained against (or on `--data`'s).

The windows and the loss are training's own (`data.eval_batches`, `train.evaluate`): a run's
`val_loss` here equals the one its training logged for the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from dropless import data
from dropless.checkpoint import load_model_dir, load_run, saved_train_config
from dropless.config import TrainConfig
from dropless.errors import DroplessError
from dropless.precision import autocast_for, resolve_device, resolve_precision
from dropless.tokenizer import delayed_bar


# eval's window flags and the TrainConfig fields they set
WINDOW_FLAGS = {"seq_len": "--seq-len", "batch_size": "--batch-size",
                "eval_batches": "--eval-batches"}


def evaluate_dir(path: str | Path, data_path: str | None = None, device: str = "auto",
                 cache_dir: str | None = None, progress: bool = False,
                 windows: dict | None = None) -> dict:
    """{"val_loss", "val_ppl", "tokens"} on the run's validation windows (its batch size, sequence
    length and number of eval batches; TrainConfig's defaults for a Hugging Face directory).
    `windows`: any of WINDOW_FLAGS' fields in their place; eval_batches 0 takes the whole split,
    in consecutive windows. Tokens are cached in `cache_dir` (default: data.default_cache_dir()),
    never in the run's saved one: a run directory may come from a stranger, and evaluating it
    must not write where it says. `progress`: bars (on stderr) while new data is tokenized and
    while the windows are scored, each shown once its work has taken a few seconds."""
    from dropless.serve.text import chat_files
    from dropless.train import evaluate

    dev = resolve_device(device)
    precision = resolve_precision("auto", dev)
    # bf16-mixed (CUDA): the matmul weights are read in bf16, the bf16 that autocast would cast
    # them to at every use, so the loss is the fp32 model's in half its memory (a 30B model's
    # fp32 weights would not fit an H100)
    matmul = torch.bfloat16 if precision == "bf16-mixed" else None
    if (Path(path) / "config.json").is_file():
        (model, tok), cfg = load_model_dir(path, dev, matmul_dtype=matmul), None
    else:
        model, tok, state = load_run(path, dev, matmul_dtype=matmul)
        cfg = saved_train_config(state)
    cfg = cfg or TrainConfig(out=str(path))   # its defaults, for a model trained elsewhere
    given = {k: v for k, v in (windows or {}).items() if v is not None}
    whole = given.get("eval_batches") == 0
    cfg = _with_windows(cfg, {**given, "eval_batches": 1} if whole else given)
    if given.get("seq_len", 0) > model.cfg.max_seq_len:
        raise DroplessError(f"--seq-len {given['seq_len']} is invalid: the model's context is "
                            f"{model.cfg.max_seq_len} tokens (max_seq_len)")
    seq_len = min(cfg.seq_len, model.cfg.max_seq_len)
    val_docs, chat = None, chat_files(Path(path))   # conversations: in the model's template
    only = cfg.assistant_only_loss   # the loss the run trained: its val_loss is comparable
    if data_path is not None:
        docs = data.read_documents(data_path, "--data", chat, only, "the run (trained with "
                                   "--assistant-only-loss, eval scores as it trained)")
    else:   # the message must not name a flag the user did not pass
        docs = data.read_documents(cfg.data, "the run's --data", chat, only)
        if cfg.val_data is not None:   # the run validated on its --val-data
            val_docs = data.read_documents(cfg.val_data, "the run's --val-data", chat, only)
    cache = Path(cache_dir) if cache_dir else data.default_cache_dir()
    tokens = data.load_tokens(docs, tok, cache, val_docs, only, progress)
    if len(tokens.val) < seq_len + 2:
        raise DroplessError(f"the validation split has only {len(tokens.val)} tokens, too few for "
                            f"sequences of {seq_len}")
    if whole:   # made as they are read: the split's windows are never all held at once
        starts = range(0, len(tokens.val) - seq_len, seq_len)
        windows = (data.windows(tokens.val, list(starts[i:i + cfg.batch_size]), seq_len,
                                tokens.val_mask) for i in range(0, len(starts), cfg.batch_size))
        num_tokens = len(starts) * seq_len
    else:
        windows = data.eval_batches(tokens.val, cfg.batch_size, seq_len, cfg.eval_batches,
                                    tokens.val_mask)
        num_tokens = cfg.batch_size * seq_len * cfg.eval_batches
    if progress:   # a whole split takes a while: a bar once it has taken BAR_DELAY_S
        count = -(-len(starts) // cfg.batch_size) if whole else cfg.eval_batches
        windows = delayed_bar(windows, "eval", total=count, unit="batch")
    loss = evaluate(model, windows, dev, autocast_for(precision, dev))
    # past ~709 nats exp overflows: the perplexity is infinite (a NaN loss stays NaN)
    return {"val_loss": loss, "val_ppl": math.inf if loss > 709 else math.exp(loss),
            "tokens": num_tokens}


def _with_windows(cfg: TrainConfig, given: dict) -> TrainConfig:
    """cfg with eval's window flags in place, checked as train checks them (the message in the
    flags' names)."""
    if not given:
        return cfg
    if given.get("eval_batches", 1) < 0:
        raise DroplessError(f"--eval-batches {given['eval_batches']} is invalid: must be an "
                            "integer >= 0 (0: the whole split)")
    try:
        return dataclasses.replace(cfg, **given)
    except ValueError as e:   # "seq_len=0 is invalid: ..." or "batch_size*seq_len=... is invalid"
        fields, rest = str(e).split("=", 1)
        names = [WINDOW_FLAGS.get(f, f) for f in fields.split("*")]
        raise DroplessError(f"{names[0]} {rest}" if len(names) == 1 else
                            f"{' x '.join(names)} = {rest}") from None


def result_json(r: dict) -> str:
    """`eval --json`'s line: strict JSON (RFC 8259 has no NaN or Infinity, which jq and JavaScript
    refuse), a non-finite loss or perplexity written as null."""
    return json.dumps({k: r[k] if math.isfinite(r[k]) else None for k in ("val_loss", "val_ppl")},
                      allow_nan=False)
