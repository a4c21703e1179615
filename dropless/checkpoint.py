"""Run directories: loading a trained (or converted, or quantized) run back for generation, and
ownership of a run directory. The checkpoint format itself is `dropless.parallel.checkpoint` (DCP).

Ownership: the process writing a run directory holds an exclusive lock on its `.lock` file (released
by the kernel when the process dies, however it dies); the file also marks the directory as a
dropless run, so a new run refuses a directory holding anything else.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from dropless.config import ModelConfig, MoEConfig
from dropless.errors import DroplessError
from dropless.model import Transformer
from dropless.parallel.checkpoint import latest, latest_path, load, read_state
from dropless.tokenizer import tokenizer_from_json

LOCK = ".lock"


def config_to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "moe": MoEConfig(**d["moe"])})


def load_run(run_dir: str | Path, device: str = "cpu"):
    """-> (model in eval mode, tokenizer, saved state) of a run directory's newest checkpoint,
    written by any mesh (or by `dropless quantize`: packed int4 modules)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DroplessError(f"{run_dir}: no such run directory")
    path = latest_path(run_dir)
    state = read_state(path)
    model = Transformer(config_from_dict(state["model_config"]))
    if "quant" in state:
        from dropless.quant.modules import QuantConfig, quantize_modules
        quantize_modules(model, QuantConfig(**state["quant"]))
    load(path, model)
    return model.to(device).eval(), tokenizer_from_json(state["tokenizer"]), state


def load_model_dir(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer) of a run directory or a Hugging Face directory (one
    with a config.json), the model in `dtype` when given: what generate and serve read."""
    if (Path(path) / "config.json").is_file():
        from dropless.convert import load_hf_dir
        try:
            model, tok_json = load_hf_dir(path, dtype=dtype or torch.float32, device=device)
        except ValueError as e:
            raise DroplessError(str(e)) from None
        if tok_json is None:
            raise DroplessError(f"{path} has no tokenizer.json: cannot encode prompts")
        return model, tokenizer_from_json(tok_json)
    model, tokenizer, _ = load_run(path, device)
    return (model if dtype is None else model.to(dtype)), tokenizer


@contextmanager
def claim_run_dir(run_dir: Path, new: bool):
    """Hold `run_dir` (created if missing) locked for this process while the block runs. A `new`
    run refuses a directory holding a run (pass --resume) or files that are not a dropless run's.
    A directory left holding only the lock (the run failed before writing) is removed again."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DroplessError(f"--out {run_dir} is a file, not a directory")
    created = not run_dir.exists()
    if new and not created and not (run_dir / LOCK).exists() and any(run_dir.iterdir()):
        raise DroplessError(f"--out {run_dir} is not empty and is not a dropless run: choose "
                            "an empty or new directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise DroplessError(f"{run_dir} is in use by another dropless process (pid "
                                f"{lock.read().strip() or '?'}); wait for it to finish or "
                                "choose another --out") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            if new and latest(run_dir) is not None:
                raise DroplessError(f"{run_dir} already holds a run: pass --resume to continue "
                                    "it, or choose another --out")
            yield
        finally:
            if [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                if created:
                    run_dir.rmdir()
