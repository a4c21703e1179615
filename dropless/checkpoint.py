"""Atomic single-file checkpoints, and loading a trained run back for generation.

File layout: a magic line, the sha256 of the payload (hex) on the second line, then the payload (a
`torch.save` of plain values and tensors, loaded with `weights_only=True`). The checksum turns any
truncated or corrupted file into a clear error instead of a confusing unpickling failure.

Atomicity: the file is written to `<name>.tmp-<pid>`, fsynced, then `os.replace`d over the previous
checkpoint and the directory fsynced. A crash at any point leaves either the old complete checkpoint
or the new complete one, never a partial file under the real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dropless.config import ModelConfig, MoEConfig
from dropless.errors import DroplessError

CHECKPOINT = "checkpoint.pt"
MAGIC = b"dropless checkpoint v1\n"
# test hook: seconds to sleep between the fsynced temp file and the rename (the kill window)
PAUSE_ENV = "DROPLESS_SAVE_PAUSE_S"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    for stale in path.parent.glob(f"{path.name}.tmp-*"):   # left by a process killed mid-save
        stale.unlink()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise DroplessError(f"{path.parent}: no checkpoint found ({path.name} is missing); "
                            "is this a run directory of `dropless train`?")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DroplessError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    header = len(MAGIC) + 65
    if not data.startswith(MAGIC) or len(data) < header:
        raise DroplessError(f"{path}: not a dropless checkpoint (corrupt or truncated)")
    payload = memoryview(data)[header:]
    if hashlib.sha256(payload).hexdigest().encode() != data[len(MAGIC):header - 1]:
        raise DroplessError(f"{path}: checkpoint is corrupt or truncated (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:   # intact bytes, unloadable content (e.g. written by a newer version)
        raise DroplessError(f"{path}: checkpoint cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def config_to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "moe": MoEConfig(**d["moe"])})


def load_run(run_dir: str | Path, device: str = "cpu"):
    """-> (model in eval mode, tokenizer, checkpoint state) of a `dropless train` run directory."""
    from dropless.model import Transformer
    from dropless.tokenizer import tokenizer_from_json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DroplessError(f"{run_dir}: no such run directory")
    state = latest_state(run_dir)
    model = Transformer(config_from_dict(state["model_config"]))
    if "quant" in state:   # written by `dropless quantize`: packed int4 modules
        from dropless.quant.modules import QuantConfig, quantize_modules
        quantize_modules(model, QuantConfig(**state["quant"]))
    if "dcp_path" in state:   # a distributed run's checkpoint, gathered into this one process
        from dropless.parallel import checkpoint as dckpt
        dckpt.load(Path(state["dcp_path"]), model)
    else:
        model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_from_json(state["tokenizer"]), state


def latest_state(run_dir: str | Path) -> dict:
    """The newest checkpoint of a run: checkpoint.pt (single process) or the newest complete
    distributed one (dropless.parallel.checkpoint), whose state holds everything but the tensors,
    plus `dcp_path` to load them from."""
    from dropless.parallel import checkpoint as dckpt

    single = Path(run_dir) / CHECKPOINT
    path = dckpt.latest(run_dir)
    if path is not None:
        extra = dckpt.read_extra(path)
        if not single.is_file() or load_checkpoint(single)["step"] < extra["step"]:
            return {**extra, "dcp_path": str(path)}
    return load_checkpoint(single)
