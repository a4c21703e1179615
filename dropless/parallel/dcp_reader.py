"""Reading a DCP checkpoint that a stranger may have written, once `checkpoint.verify` has checked
its files against their manifest and by size. Nothing read runs code, reaches past the shards the
manifest lists, blocks, or allocates more than the model being loaded bounds (the caller derives
every cap from it):

1. `.metadata`, a pickle: its opcodes are scanned first, against those DCP's metadata uses and a
   count (2 MB of EMPTY_SET opcodes unpickle to 430 MB of sets, never seen by find_class), then
   unpickled admitting only DCP's metadata classes.
2. Every item it describes (a tensor chunk, or a non-tensor value) lies inside a shard that the
   manifest lists: never a FIFO, a device or a link elsewhere (`verify` admits regular files only).
3. Every item, as read, is a torch.save zip (what DCP writes) of stored, uncompressed entries that
   fit in it, so that nothing inflates: a tensor chunk's storage is exactly the chunk's bytes, and
   a value (its pickle, tensors included) is at most `max_value` bytes.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (Metadata, MetadataIndex, StorageMeta,
                                                     TensorStorageMetadata)

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


class _Slice(io.RawIOBase):
    """Bytes [start, start + size) of an open file as a file of their own, never read past: how
    zipfile and torch.load read an item (torch's own view of one seeks from its end wrongly)."""

    def __init__(self, file, start: int, size: int):
        super().__init__()
        self.file, self.start, self.size, self.pos = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = max(0, offset + (0, self.pos, self.size)[whence])
        return self.pos

    def read(self, size: int | None = -1) -> bytes:   # RawIOBase's allocates `size` bytes first
        left = max(0, self.size - self.pos)
        self.file.seek(self.start + self.pos)
        data = self.file.read(left if size is None or size < 0 else min(size, left))
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:   # how torch.load reads a storage: no copy between
        view = memoryview(buffer).cast("B")[:max(0, self.size - self.pos)]
        self.file.seek(self.start + self.pos)
        count = self.file.readinto(view) or 0
        self.pos += count
        return count


def _is_storage(name: str) -> bool:
    """A torch.save zip entry holding a storage's bytes (`archive/data/0`), not a pickle."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


class SafeReader(dcp.FileSystemReader):
    """Reads `.metadata` once, up front, so that a refusal is one clear error (inside dcp.load it
    would be wrapped in a CheckpointException with tracebacks), and checks every item against
    the shards it lies in (`shards`: name -> size, the manifest's verified files) before DCP
    reads it."""

    def __init__(self, path: Path, shards: dict[str, int], *, max_metadata: int, max_ops: int,
                 max_value: int):
        super().__init__(path)
        where = path / ".metadata"
        self.metadata = read_metadata(where, max_metadata, max_ops)
        self.max_value = max_value
        self.chunk_bytes = {}   # id(storage info) -> the bytes of the tensor chunk it holds
        try:
            chunks = {(fqn, tuple(c.offsets)): math.prod(c.sizes) * md.properties.dtype.itemsize
                      for fqn, md in self.metadata.state_dict_metadata.items()
                      if isinstance(md, TensorStorageMetadata) for c in md.chunks}
            for index, info in self.metadata.storage_data.items():
                if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
                    raise TypeError(f"an item of {type(index).__name__} and "
                                    f"{type(info).__name__}")
                self._check(where, shards, info)
                if isinstance(index.offset, torch.Size) and (index.fqn, index.offset) in chunks:
                    self.chunk_bytes[id(info)] = chunks[index.fqn, index.offset]
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

    def _slice_file(self, file, sinfo):
        """The item `sinfo` of the open shard `file`, checked to inflate to nothing more than
        it holds (a deflated entry of 256 KB can hold a 256 MiB tensor of zeros)."""
        item = _Slice(file, sinfo.offset, sinfo.length)
        where = f"{self.path / sinfo.relative_path}: the item at byte {sinfo.offset:,}"
        try:
            with zipfile.ZipFile(item) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise DroplessError(f"{where} is not a torch.save archive ({e})") from None
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
            raise DroplessError(f"{where} holds compressed entries (DCP stores them as they are; "
                                "a small one can inflate to any size)")
        stored = sum(e.file_size for e in entries if _is_storage(e.filename))
        pickled = sum(e.file_size for e in entries if not _is_storage(e.filename))
        chunk = self.chunk_bytes.get(id(sinfo))   # None: a non-tensor value
        if stored + pickled > sinfo.length:
            raise DroplessError(f"{where} has entries of {stored + pickled:,} bytes in its "
                                f"{sinfo.length:,}")
        if chunk is not None and stored != chunk:
            raise DroplessError(f"{where} holds {stored:,} bytes of tensor data, not the "
                                f"{chunk:,} of the tensor chunk it is for")
        value = pickled if chunk is not None else stored + pickled   # a tensor's: its pickle
        if value > self.max_value:
            raise DroplessError(f"{where} holds a pickled value of {value:,} bytes, over the "
                                f"{self.max_value:,} that the model being loaded can need")
        item.seek(0)
        return item


class SafePlanner(dcp.DefaultLoadPlanner):   # built with its default flatten_state_dict=True
    def load_bytes(self, read_item, value):   # non-tensor values: plain data only
        obj = torch.load(value, weights_only=True)
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
