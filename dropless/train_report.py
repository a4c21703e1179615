"""What `train()` reports beyond its loop: the error that stops a diverged run, and the sample
from the trained model."""

from __future__ import annotations

import math

import torch

from dropless.config import TrainConfig
from dropless.errors import DroplessError

SAMPLE_PROMPT = "def "


def diverged(cfg: TrainConfig, precision: str, recent, step: int, since: int,
             saved_step: int, val_loss: float | None = None) -> DroplessError:
    """The error that stops a run whose training loss the host saw non-finite after `step`, or
    whose validation loss (`val_loss`, evaluated after `step`) is; every step through `since` was
    seen finite. `recent`: the last steps' losses on the device (the newest last), read here to
    name the first non-finite step (a sync on the way out only). Nothing past `saved_step` was
    saved, so that checkpoint stays the one --resume takes."""
    losses = torch.stack(list(recent)).tolist()   # sync: the error names the step
    first = step - len(losses) + 1
    what = "training"
    bad = next((first + i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if val_loss is not None and bad is None:   # the weights the last step left give it
        what, where, value = "validation", f"after step {step}", val_loss
    elif bad is None:   # only the log window's mean, over steps older than `recent`, is not finite
        where, value = f"between steps {since + 1} and {first - 1}", "non-finite"
    else:
        where = (f"at step {bad}" if bad > first or first <= since + 1 else
                 f"between steps {since + 1} and {bad}")
        value = losses[bad - first]
    kept = (f"the latest checkpoint (step {saved_step}) in {cfg.out} is left as it was"
            if saved_step > 0 else "no checkpoint was saved")
    tries = [f"a lower --lr (this run's: {cfg.lr:g})",
             f"a lower --grad-clip (this run's: {cfg.grad_clip:g})" if cfg.grad_clip else
             "--grad-clip 1.0 (this run's: off)"]
    if precision != "fp32":   # the one of these a resumed run may change
        tries.append(f"--precision fp32 (this run's: {precision})")
    return DroplessError(f"the {what} loss became {value} {where}: stopped, {kept}; try "
                         + ", ".join(tries[:-1]) + f" or {tries[-1]}")


def training_sample(model, model_cfg, cfg: TrainConfig, rt, tok) -> str | None:
    """A short sample from the trained model, on rank 0 (under torchrun from the gathered
    weights, in the dtype `generate` decodes in, where they fit)."""
    from dropless.generate import generate
    from dropless.model import Transformer
    from dropless.parallel import gathered_model
    from dropless.serve.text import decode_dtype

    sample_model = model
    if rt.world > 1:
        sample_model = gathered_model(model, lambda: Transformer(model_cfg), rt,
                                      decode_dtype(rt.device))
        if sample_model is None:
            return None
    prompt = tok.encode(SAMPLE_PROMPT).tolist()
    new = generate(sample_model, [prompt],
                   min(cfg.sample_tokens, model_cfg.max_seq_len - len(prompt)),
                   temperature=0.8, top_k=40, seed=cfg.seed)[0]
    return SAMPLE_PROMPT + tok.decode(new, continuation=True)
