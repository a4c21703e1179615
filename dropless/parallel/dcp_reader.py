"""Reading a DCP checkpoint that a stranger may have written, once `checkpoint.verify` has checked
its files against their manifest: nothing read runs code or reaches outside its directory."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

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
    would be wrapped in a CheckpointException with tracebacks)."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with open(path / ".metadata", "rb") as f:
                self.metadata = _MetadataUnpickler(f).load()
        except Exception as e:   # anything but DCP's metadata is refused, never run
            raise DroplessError(f"{path / '.metadata'}: not a DCP metadata file ({e})") from None
        for info in (self.metadata.storage_data or {}).values():
            if Path(info.relative_path).name != info.relative_path:
                raise DroplessError(f"{path / '.metadata'}: names {info.relative_path!r}, not a "
                                    "file of its checkpoint directory")
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()

    def read_metadata(self, *args, **kwargs):
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafePlanner(dcp.DefaultLoadPlanner):   # built with its default flatten_state_dict=True
    def load_bytes(self, read_item, value):   # non-tensor values: plain data only
        obj = torch.load(value, weights_only=True)
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
