"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own
shards; a checkpoint loads at any mesh (or in one process) with identical params and AdamW state.

Layout: RUN_DIR/dcp/step-00000010/ holds the DCP files (`.metadata`, `__<rank>_0.distcp`), `extra.pt`
(plain values from rank 0: step, schedule, data state, RNG, configs) and, written LAST by rank 0
after a barrier, the completion marker `COMPLETE`: JSON with the step and the sha256 of every other
file. A directory without the marker (a crash during the save) is skipped with a warning and the
previous checkpoint is used, so a kill mid-save loses at most the steps since the previous one.

Trust: loading verifies every file against the marker's checksums first (a damaged shard is an
error naming the file, never weights of 3e38), and nothing read runs code: `.metadata` (a pickle)
goes through an unpickler that admits only DCP's own metadata classes, and non-tensor values load
with `weights_only=True` (torch's defaults unpickle both without restriction).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from dropless.checkpoint import PAUSE_ENV, write_atomic
from dropless.errors import DroplessError

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
        sums = {f.name: _sha256(f) for f in sorted(path.iterdir()) if f.is_file()}
        if os.environ.get(PAUSE_ENV):   # test hook: the kill window before the marker
            time.sleep(float(os.environ[PAUSE_ENV]))
        write_atomic(path / MARKER, json.dumps({"step": step, "sha256": sums}).encode())
    _barrier()
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verify(path: Path, names: list[str] | None = None) -> None:
    """Check `names` (default: every file the marker lists) against the marker's checksums."""
    try:
        sums = json.loads((path / MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DroplessError(f"{path / MARKER}: not a checksum manifest (damaged, or written by "
                            "an older dropless without checksums)") from None
    for name in names or [".metadata", *sums]:
        if name not in sums or not (path / name).is_file() or _sha256(path / name) != sums[name]:
            raise DroplessError(f"{path / name}: checkpoint file is damaged or missing "
                                "(checksum mismatch)")


# What a DCP `.metadata` pickle may name: DCP's metadata dataclasses and the torch values inside
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


class _SafeReader(dcp.FileSystemReader):
    """Reads `.metadata` once, up front, so that a refusal is one clear error (inside dcp.load it
    would be wrapped in a CheckpointException with tracebacks)."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with open(path / ".metadata", "rb") as f:
                self.metadata = _MetadataUnpickler(f).load()
        except Exception as e:   # anything but DCP's metadata is refused, never run
            raise DroplessError(f"{path / '.metadata'}: not a DCP metadata file ({e})") from None
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value):   # non-tensor values: plain data only
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


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
    _verify(path, [EXTRA])
    return torch.load(path / EXTRA, weights_only=True)


def load(path: Path, model: nn.Module, optimizer=None) -> dict:
    """Load into `model` (and `optimizer`) as laid out NOW (any mesh, or one process without a
    process group); DCP reshards. Returns the extra dict saved with it."""
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": model_sd}
    if optimizer is not None:
        state["optim"] = optim_sd
    _verify(path)   # every rank reads every file once more: the price of knowing they are intact
    try:
        with warnings.catch_warnings():   # "no process group: loading in one process" is intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except CheckpointException as e:   # e.g. a value that is not plain data: one line, no traces
        cause = next(iter(e.failures.values()), (e,))[0]
        raise DroplessError(f"{path}: checkpoint cannot be loaded ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    return read_extra(path)


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts on CPU, keyed by parameter name; collective, and
    only rank 0 receives them (the others get empty dicts)."""
    return get_state_dict(model, optimizer if optimizer is not None else [],
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def convert(run_dir: str | Path, out: str | Path) -> int:
    """`dropless convert RUN_DIR --to-safetensors OUT`: the run's latest complete checkpoint (DCP
    from any mesh, or a single-process checkpoint.pt) as one safetensors file, every expert present
    once and tied weights under each name. Returns the number of tensors."""
    from safetensors.torch import save_file

    from dropless.checkpoint import load_run

    model = load_run(run_dir)[0]
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out))
    return len(tensors)
