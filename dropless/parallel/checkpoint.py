"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own
shards; a checkpoint loads at any mesh (or in one process) with identical params and AdamW state.

Layout: RUN_DIR/dcp/step-00000010/ holds the DCP files (`.metadata`, `__<rank>_0.distcp`), `extra.pt`
(plain values from rank 0: step, schedule, data state, RNG, configs) and, written LAST by rank 0
after a barrier, the completion marker `COMPLETE`. A directory without the marker (a crash during
the save) is skipped with a warning and the previous checkpoint is used, so a kill mid-save loses
at most the steps since the previous checkpoint.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from dropless.checkpoint import PAUSE_ENV

DCP_DIR = "dcp"
MARKER = "COMPLETE"
EXTRA = "extra.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / DCP_DIR / f"step-{step:08d}"


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer=None,
         extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    path = step_dir(run_dir, step)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    dcp.save(state, checkpoint_id=path)
    if _rank() == 0:
        torch.save({"step": step, **(extra or {})}, path / EXTRA)
    _barrier()   # every rank's shards are on disk before the marker says so
    if _rank() == 0:
        if os.environ.get(PAUSE_ENV):   # test hook: the kill window before the marker
            time.sleep(float(os.environ[PAUSE_ENV]))
        with open(path / MARKER, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
    _barrier()
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory; incomplete ones are skipped with a warning."""
    root = Path(run_dir) / DCP_DIR
    for path in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        if (path / MARKER).is_file():
            return path
        warnings.warn(f"{path}: incomplete checkpoint (no {MARKER} marker: the save was "
                      "interrupted); skipping it and using the previous one", stacklevel=2)
    return None


def read_extra(path: Path) -> dict:
    return torch.load(path / EXTRA, weights_only=True)


def load(path: Path, model: nn.Module, optimizer=None) -> dict:
    """Load into `model` (and `optimizer`) as laid out NOW (any mesh, or one process without a
    process group); DCP reshards. Returns the extra dict saved with it."""
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    return read_extra(path)


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts on CPU, keyed by parameter name; collective, and
    only rank 0 receives them (the others get empty dicts)."""
    return get_state_dict(model, optimizer if optimizer is not None else [],
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def to_safetensors(model: nn.Module, out: str | Path) -> int:
    """One consolidated file from a single-process (unsharded) model: every expert present once.
    Tied weights are written under each name. Returns the number of tensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out))
    return len(tensors)


def convert(run_dir: str | Path, out: str | Path) -> int:
    """`dropless convert RUN_DIR --to-safetensors OUT`: the run's latest complete checkpoint (DCP
    from any mesh, or a single-process checkpoint.pt) as one safetensors file."""
    from dropless.checkpoint import load_run

    return to_safetensors(load_run(run_dir)[0], out)
