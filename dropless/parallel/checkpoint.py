"""Checkpoints in one format for one process and many: torch.distributed.checkpoint (DCP). Every
rank writes its own shards (one process writes them all); a checkpoint loads at any mesh, or in one
process, with identical params and AdamW state: DCP reshards. (Run directories, on top of this,
are `dropless.checkpoint`'s; this is here because only parallel/ imports torch.distributed.)

Layout: RUN_DIR/dcp/step-00000010/ holds the DCP files (`.metadata`, `__<rank>_0.distcp`),
`state.json` (rank 0's plain values: step, schedule, data key, RNG, configs, tokenizer) and
`COMPLETE`: JSON with the step and the sha256 of every other file. The two newest are kept.

Atomicity: every rank writes into `dcp/.step-00000010.tmp` (DCP fsyncs its files); after a barrier
rank 0 writes the manifest, renames the directory into place and fsyncs `dcp/`. A kill at any moment
leaves the previous checkpoint whole; the next save removes the interrupted temp directory.

Trust: loading verifies every file against the manifest first (a damaged shard is an error naming
the file, never weights of 3e38), after checking by size alone that the files fit the model being
loaded (a planted sparse file of terabytes is refused, not hashed for hours; shards too small to
hold the model are refused too, so that a forged state.json cannot describe a model larger than the
weights that came with it: `verify` refuses it before it is allocated), and nothing read runs
code, reaches outside the files the manifest lists or allocates past caps drawn from the model:
`.metadata` (a pickle) is scanned and unpickled admitting only what DCP's metadata holds, and every
item it names is an uncompressed zip inside a listed shard (`dcp_reader`); non-tensor values load
with `weights_only=True`, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from dropless.errors import DroplessError
from dropless.files import (MAX_SMALL_FILE, fsync_dir, read_json_object, read_small_json,
                            write_atomic)
from dropless.parallel.dcp_reader import SafePlanner, SafeReader

DCP_DIR = "dcp"
MARKER = "COMPLETE"
# Caps on what a checkpoint's files can hold, per item (a tensor chunk, or a non-tensor value):
# every item is a torch.save zip of ~1.2 KB or more; `.metadata` spends ~110 pickle opcodes and
# ~290 bytes on one (torch 2.13; tiny and AdamW on 1 to 4 ranks), room for names of ~300 bytes
MIN_ITEM, ITEM_OPS, ITEM_BYTES = 512, 256, 1024
STATE = "state.json"
KEEP = 2   # checkpoints kept: the newest, and one more in case it is damaged
# test hook: seconds `save` sleeps between the complete temp directory and its rename
PAUSE_ENV = "DROPLESS_SAVE_PAUSE_S"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / DCP_DIR / f"step-{step:08d}"


def _state_dicts(model: nn.Module, optimizer) -> dict:
    """What DCP saves and loads: the model's (and optimizer's) state keyed by parameter name."""
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    return {"model": model_sd} | ({"optim": optim_sd} if optimizer is not None else {})


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer=None,
         state: dict | None = None) -> Path:
    """Collective: every rank calls it (or one process). `state`: JSON values saved beside the
    tensors. Returns the checkpoint directory."""
    path = step_dir(run_dir, step)
    tmp = path.with_name(f".{path.name}.tmp")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(".step-*.tmp"):
            warnings.warn(f"{stale}: removing an interrupted checkpoint save", stacklevel=2)
            shutil.rmtree(stale)
    _barrier()   # the temp directory is fresh before any rank writes into it
    try:
        with warnings.catch_warnings():   # "no process group: saving in one process" is intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp)
    except CheckpointException as e:   # raised on every rank: a full disk, a refused write
        if _rank() == 0:   # every rank is done writing; its partial shards would fill the disk
            shutil.rmtree(tmp, ignore_errors=True)
        raise DroplessError(f"{path}: the checkpoint of step {step} could not be written "
                            f"({_cause(e)}); the previous checkpoint, if any, is whole") from None
    if _rank() == 0:
        write_atomic(tmp / STATE, json.dumps({"step": step, **(state or {})}).encode())
    _barrier()   # every rank's shards are on disk before the manifest says so
    if _rank() == 0:
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_atomic(tmp / MARKER, json.dumps({"step": step, "sha256": sums}).encode())
        if os.environ.get(PAUSE_ENV):   # test hook: the kill window before the rename
            time.sleep(float(os.environ[PAUSE_ENV]))
        if path.exists():   # an older save of this step without its manifest (see latest)
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        for old in sorted(path.parent.glob("step-*"))[:-KEEP]:
            shutil.rmtree(old)
    _barrier()
    return path


def _failure(e: CheckpointException) -> BaseException:
    """The first rank's failure (DCP wraps each rank's with its traceback)."""
    return next(iter(e.failures.values()), (e,))[0]


def _cause(e: CheckpointException) -> str:
    """The first rank's failure in one line."""
    cause = _failure(e)
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _shard_bytes(model: nn.Module) -> tuple[int, int]:
    """The fewest and the most bytes a checkpoint of `model` can hold in its shards, counted from
    the model (never from a file, which could move them; on the meta device it costs no memory) at
    global sizes (a DTensor's numel is global). Fewest: each tensor of its state once, at 2 bytes
    an element (bf16, the narrowest float saved) or its own size when narrower. Most: its state and
    AdamW's two moments per parameter (saved by training whether or not this load asks for them),
    at 4 bytes an element or more (an fp32 checkpoint may load into bf16), doubled for DCP's ~1.5 KB
    header per chunk (every FSDP rank writes a chunk of every tensor), plus 64 MiB for non-tensor
    values."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * max(t.element_size(), 4)
    state = model.state_dict(keep_vars=True)
    distinct = {id(t): t for t in state.values()}.values()   # a tied weight has two names
    fewest = sum(t.numel() * min(t.element_size(), 2) for t in distinct)
    moments = sum(2 * nbytes(p) for p in model.parameters())
    return fewest, 2 * (sum(nbytes(t) for t in state.values()) + moments) + 64 * 2**20


def _read_caps(model: nn.Module, shards: dict[str, int]) -> dict[str, int]:
    """What `SafeReader` may read of a checkpoint of `model` with shards of these sizes (name ->
    bytes), each cap a few times what DCP writes. Items (tensor chunks, non-tensor values): a
    rank's shard holds at most one chunk of each entry of the state (the model's; AdamW's step and
    two moments per parameter; 64 optimizer hyperparameters), of MIN_ITEM bytes or more. The
    largest value saved is an optimizer's list of parameter names."""
    names = list(model.state_dict())
    entries = len(names) + 3 * sum(1 for _ in model.parameters()) + 64
    items = sum(min(entries, size // MIN_ITEM) for size in shards.values())
    return dict(max_metadata=ITEM_BYTES * items + 2**16, max_ops=ITEM_OPS * items + 2**12,
                max_value=2**16 + 2 * sum(len(name) + 8 for name in names))


def verify(path: Path, model: nn.Module | None = None, names: list[str] | None = None,
           sizes_only: bool = False) -> dict[str, int]:
    """Check `names` (default: every file the manifest lists) against the manifest's checksums.
    Sizes come first, by stat alone, so that no file is hashed unbounded: the shards (DCP's files
    but `.metadata`) must fit `model`'s state (`_shard_bytes`), `.metadata` their number of items
    (`_read_caps`), state.json a cap of its own. With `sizes_only`, a `model` on the meta device
    is checked before its memory exists. Returns the shards checked: name -> size."""
    if path.is_symlink():
        raise DroplessError(f"{path}: a symbolic link; a checkpoint is a directory of its run")
    try:
        sums = dict(read_small_json(path / MARKER)["sha256"])   # {name: hex digest}, no list
    except (ValueError, KeyError, TypeError):
        raise DroplessError(f"{path / MARKER}: not a checksum manifest (damaged, or written by "
                            "an older dropless without checksums)") from None
    files = [path / name for name in names or [".metadata", *sums]]
    sizes, shard_bytes = {}, 0
    fewest, most = _shard_bytes(model) if model is not None else (0, 0)
    damaged = "checkpoint file is damaged or missing (checksum mismatch)"
    for file in files:   # a manifest's names are the directory's own files: none reach out of it
        if file.is_symlink():   # dropless writes none: one would make it read a file elsewhere
            raise DroplessError(f"{file}: a symbolic link; checkpoint files must be the "
                                "directory's own regular files")
        if file.parent != path or file.name not in sums or not file.is_file():
            raise DroplessError(f"{file}: {damaged}")
        sizes[file.name] = size = file.stat().st_size
        if file.name == STATE and size > MAX_SMALL_FILE:
            raise DroplessError(f"{file}: {damaged}")
        shard_bytes += 0 if file.name in (".metadata", STATE) else size
        if shard_bytes > most:
            raise DroplessError(f"{file}: the checkpoint's shards reach {shard_bytes:,} bytes "
                                f"with this one, over the {most:,} that the model being loaded "
                                "can need")
    shards = {name: size for name, size in sizes.items() if name not in (".metadata", STATE)}
    if ".metadata" in sizes:   # without a model, no shard passes: nothing to size it by
        cap = _read_caps(model, shards)["max_metadata"] if model is not None else 0
        if sizes[".metadata"] > cap:
            raise DroplessError(f"{path / '.metadata'}: {sizes['.metadata']:,} bytes, over the "
                                f"{cap:,} that DCP's metadata of the model being loaded can need")
    # shards too small for the model are hashed even so (they are small): a damaged one is named
    for file in () if sizes_only and shard_bytes >= fewest else files:
        if _sha256(file) != sums[file.name]:
            raise DroplessError(f"{file}: {damaged}")
    if shard_bytes < fewest:
        raise DroplessError(f"{path}: the checkpoint's shards hold {shard_bytes:,} bytes, fewer "
                            f"than the {fewest:,} of the model being loaded (2 bytes a weight): "
                            "they cannot hold it (a state.json describing another model?)")
    return shards


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory; one without its manifest is skipped with a
    warning."""
    root = Path(run_dir) / DCP_DIR
    for path in sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []:
        if (path / MARKER).is_file():
            return path
        warnings.warn(f"{path}: incomplete checkpoint (no {MARKER} manifest); skipping it and "
                      "using the previous one", stacklevel=2)
    return None


def read_state(path: Path) -> dict:
    """The JSON values saved with the checkpoint at `path`, step included."""
    verify(path, names=[STATE])
    return read_json_object(path / STATE)


def latest_path(run_dir: str | Path) -> Path:
    path = latest(run_dir)
    if path is None:
        raise DroplessError(f"{run_dir}: no checkpoint found (no complete {DCP_DIR}/step-*); "
                            "is this a run directory of `dropless train`?")
    return path


def load(path: Path, model: nn.Module, optimizer=None) -> dict:
    """Load into `model` (and `optimizer`) as laid out NOW (any mesh, or one process without a
    process group); DCP reshards. Returns the JSON state saved with it."""
    state = _state_dicts(model, optimizer)
    # every rank reads every file once more: the price of knowing they are intact
    shards = verify(path, model)
    reader = SafeReader(path, shards, **_read_caps(model, shards))
    # a model with no DTensor loads in this process alone, process group or not (rank 0 reading
    # an --init source under torchrun)
    alone = not any(isinstance(t, DTensor) for t in state["model"].values())
    try:
        with warnings.catch_warnings():   # "no process group: loading in one process" is intended
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=alone)
    except CheckpointException as e:   # e.g. a value that is not plain data: one line, no traces
        if isinstance(_failure(e), DroplessError):   # the reader's refusal names the file
            raise DroplessError(str(_failure(e))) from None
        raise DroplessError(f"{path}: checkpoint cannot be loaded ({_cause(e)})") from None
    set_state_dict(model, optimizer if optimizer is not None else [],
                   model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))
    return read_state(path)
