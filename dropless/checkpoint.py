"""Atomic single-file checkpoints, and loading a trained run back for generation.

File layout: a magic line, the sha256 of the payload (hex) on the second line, then the payload (a
`torch.save` of plain values and tensors, loaded with `weights_only=True`). The checksum turns any
truncated or corrupted file into a clear error instead of a confusing unpickling failure.

Atomicity: the file is written to `<name>.tmp-<pid>`, fsynced, then `os.replace`d over the previous
checkpoint and the directory fsynced. A crash at any point leaves either the old complete checkpoint
or the new complete one, never a partial file under the real name.

Ownership: the process writing a run directory holds an exclusive lock on its `.lock` file (released
by the kernel when the process dies, however it dies); the file also marks the directory as a
dropless run, so a new run refuses a directory holding anything else.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from dropless.config import ModelConfig, MoEConfig
from dropless.errors import DroplessError

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
MAGIC = b"dropless checkpoint v1\n"
# test hook: seconds to sleep between the fsynced temp file and the rename (the kill window)
PAUSE_ENV = "DROPLESS_SAVE_PAUSE_S"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, *chunks: bytes, pause: bool = False) -> None:
    """Write `path` through an fsynced temp file and a rename: all of it or none of it."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):   # left by a process killed mid-save
        stale.unlink()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:   # a full disk: name the file (write errors carry no filename)
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    if pause and os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    write_atomic(path, MAGIC, hashlib.sha256(payload).hexdigest().encode() + b"\n", payload,
                 pause=True)


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


def load_model_dir(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """-> (model in eval mode, tokenizer) of a run directory or a Hugging Face directory (one
    with a config.json), the model in `dtype` when given: what generate and serve read."""
    from dropless.tokenizer import tokenizer_from_json

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

def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run holds a complete checkpoint (single-process or distributed)."""
    from dropless.parallel import checkpoint as dckpt

    return (Path(run_dir) / CHECKPOINT).is_file() or dckpt.latest(run_dir) is not None


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
            if new and has_checkpoint(run_dir):
                raise DroplessError(f"{run_dir} already holds a run: pass --resume to continue "
                                    "it, or choose another --out")
            yield
        finally:
            if [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                if created:
                    run_dir.rmdir()


def latest_state(run_dir: str | Path) -> dict:
    """The newest checkpoint of a run: checkpoint.pt (single process) or the newest complete
    distributed one (dropless.parallel.checkpoint) found under RUN_DIR/dcp, whose state holds
    everything but the tensors, plus `dcp_path` to load them from."""
    from dropless.parallel import checkpoint as dckpt

    single = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(single) if single.is_file() else None
    if state is not None and "dcp_path" in state:   # never follow a path read from a file
        raise DroplessError(f"{single}: field 'dcp_path' is not allowed (a checkpoint must not "
                            "point outside its run directory)")
    path = dckpt.latest(run_dir)
    if path is not None:
        extra = dckpt.read_extra(path)
        if state is None or state["step"] < extra["step"]:
            return {**extra, "dcp_path": str(path)}
    return load_checkpoint(single) if state is None else state
