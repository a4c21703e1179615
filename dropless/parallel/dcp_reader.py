"""Reading a DCP checkpoint that a stranger may have written, once `checkpoint.verify` has checked
its files against their manifest: nothing read runs code, blocks, or reaches past the shards the
manifest lists. Every item `.metadata` describes (a tensor chunk, or a non-tensor value) lies
inside a listed shard: never a FIFO, a device or a link elsewhere (`verify` admits regular files
only), and within its size."""

from __future__ import annotations

import pickle
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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


class SafeReader(dcp.FileSystemReader):
    """Reads `.metadata` once, up front, so that a refusal is one clear error (inside dcp.load it
    would be wrapped in a CheckpointException with tracebacks), and checks that every item lies
    inside a shard (`shards`: name -> size, the manifest's verified files) before DCP reads it."""

    def __init__(self, path: Path, shards: dict[str, int]):
        super().__init__(path)
        where = path / ".metadata"
        try:
            with open(where, "rb") as f:
                self.metadata = _MetadataUnpickler(f).load()
            if not isinstance(self.metadata, Metadata):
                raise TypeError(f"a pickled {type(self.metadata).__name__}")
        except Exception as e:   # anything but DCP's metadata is refused, never run
            raise DroplessError(f"{where}: not a DCP metadata file ({e})") from None
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
