"""Reading a DCP checkpoint that a stranger may have written, once `checkpoint.verify` has checked
its files against their manifest and by size. Nothing read runs code, reaches past the shards the
manifest lists, blocks, or allocates more than the model being loaded bounds (the caller derives
every cap from it):

1. `.metadata`, a pickle: its opcodes are scanned first, against those DCP's metadata uses and a
   count (2 MB of EMPTY_SET opcodes unpickle to 430 MB of sets, never seen by find_class), then
   unpickled admitting only DCP's metadata classes.
2. Every item it describes (a tensor chunk, or a non-tensor value) lies inside a shard that the
   manifest lists: never a FIFO, a device or a link elsewhere (`verify` admits regular files only).
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from dropless.errors import DroplessError

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

# The pickle opcodes of DCP's metadata: those torch 2.13 writes (protocol 4; 1 to 4 ranks, with
# AdamW state), and what the same dicts, lists, tuples, strings, numbers, bools and objects take
# otherwise: True, one-entry dicts, strings of 256 bytes or more, ints past 2**31 (offsets in
# shards over 2 GiB), floats, and the protocol 2-3 forms of globals and memo entries. Not sets,
# bytes, extension codes or persistent ids: nothing of DCP's metadata is one.
_METADATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "NONE", "NEWFALSE", "NEWTRUE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_LIST", "APPEND", "APPENDS", "EMPTY_DICT", "SETITEM", "SETITEMS",
    "STACK_GLOBAL", "GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def read_metadata(file: Path, max_bytes: int, max_ops: int) -> Metadata:
    """DCP's metadata pickle `file`, of at most `max_bytes` bytes and `max_ops` opcodes."""
    try:
        with open(file, "rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:   # grew since it was checked
            raise ValueError(f"over {max_bytes:,} bytes")
        for count, (op, _, _) in enumerate(pickletools.genops(raw), 1):
            if op.name not in _METADATA_OPCODES:
                raise pickle.UnpicklingError(f"pickle opcode {op.name} is not DCP metadata's")
            if count > max_ops:
                raise pickle.UnpicklingError(f"over {max_ops:,} pickle opcodes, more than the "
                                             "metadata of the model being loaded can need")
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"a pickled {type(metadata).__name__}")
    except Exception as e:   # anything but DCP's metadata is refused, never run
        raise DroplessError(f"{file}: not a DCP metadata file ({e})") from None
    return metadata


class SafeReader(dcp.FileSystemReader):
    """Reads `.metadata` once, up front, so that a refusal is one clear error (inside dcp.load it
    would be wrapped in a CheckpointException with tracebacks), and checks that every item lies
    inside a shard (`shards`: name -> size, the manifest's verified files) before DCP reads it."""

    def __init__(self, path: Path, shards: dict[str, int], *, max_metadata: int, max_ops: int):
        super().__init__(path)
        where = path / ".metadata"
        self.metadata = read_metadata(where, max_metadata, max_ops)
        try:
            for index, info in self.metadata.storage_data.items():
                if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
                    raise TypeError(f"an item of {type(index).__name__} and "
                                    f"{type(info).__name__}")
                self._check(where, shards, info)
        except (AttributeError, TypeError) as e:   # a forged structure: fields of wrong types
            raise DroplessError(f"{where}: not a DCP metadata file ({e})") from None
        if not isinstance(self.metadata.storage_meta, StorageMeta):   # None: an older DCP's
            self.metadata.storage_meta = StorageMeta()

    @staticmethod
    def _check(where: Path, shards: dict[str, int], info: _StorageInfo) -> None:
        name, start, length = info.relative_path, info.offset, info.length
        if not isinstance(name, str) or name not in shards:
            raise DroplessError(f"{where}: names {name!r}, not a file of its checkpoint "
                                "directory (a shard its manifest lists)")
        if not (type(start) is int and type(length) is int and 0 <= start
                and 0 <= length <= shards[name] - start):
            raise DroplessError(f"{where}: an item at bytes {start!r}+{length!r} of {name} runs "
                                f"past the end of the file ({shards[name]:,} bytes)")
        if getattr(info, "transform_descriptors", None):   # older torch has no such field
            raise DroplessError(f"{where}: an item of {name} is transformed (compressed?): "
                                "dropless writes none, and reads none")

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafePlanner(dcp.DefaultLoadPlanner):   # built with its default flatten_state_dict=True
    def load_bytes(self, read_item, value):   # non-tensor values: plain data only
        obj = torch.load(value, weights_only=True)
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
