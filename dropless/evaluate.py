"""`dropless eval`: validation loss and perplexity of a run directory (quantized or not) or a Hugging
Face directory, on the validation split the run trained against (or on `--data`'s).

The windows and the loss are training's own (`data.eval_batches`, `train.evaluate`): a run's
`val_loss` here equals the one its training logged for the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

from dropless import data
from dropless.checkpoint import load_model_dir, load_run
from dropless.config import TrainConfig
from dropless.errors import DroplessError
from dropless.precision import autocast_for, resolve_device, resolve_precision


def evaluate_dir(path: str | Path, data_path: str | None = None, device: str = "auto") -> dict:
    """{"val_loss", "val_ppl", "tokens"} on the run's validation windows (its batch size, sequence
    length and number of eval batches; TrainConfig's defaults for a Hugging Face directory)."""
    from dropless.train import evaluate

    dev = resolve_device(device)
    if (Path(path) / "config.json").is_file():
        (model, tok), saved = load_model_dir(path, dev), {}
    else:
        model, tok, state = load_run(path, dev)
        saved = state.get("train_config") or {}
    batch_size = saved.get("batch_size", TrainConfig.batch_size)
    seq_len = min(saved.get("seq_len", TrainConfig.seq_len), model.cfg.max_seq_len)
    batches = saved.get("eval_batches", TrainConfig.eval_batches)
    if data_path is not None:
        docs = data.read_documents(data_path)
    else:   # the message must not name a flag the user did not pass
        docs = data.read_documents(saved.get("data"), "the run's --data")
    cache = saved.get("cache_dir")
    tokens = data.load_tokens(docs, tok, Path(cache) if cache else data.default_cache_dir())
    if len(tokens.val) < seq_len + 2:
        raise DroplessError(f"the validation split has only {len(tokens.val)} tokens, too few for "
                            f"sequences of {seq_len}")
    windows = data.eval_batches(tokens.val, batch_size, seq_len, batches)
    loss = evaluate(model, windows, dev, autocast_for(resolve_precision("auto", dev), dev))
    return {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": batch_size * seq_len * batches}
