"""Checkpoints and run directories from strangers: a forged file is one clear error naming it,
before it can make the loader read outside its directory, block, run code or allocate without
bounds. Forged files are built small (at most a few hundred KB), whatever they would inflate to."""

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import forge
from dropless.checkpoint import LOCK, claim_run_dir
from dropless.config import PRESETS
from dropless.errors import DroplessError
from dropless.model import Transformer
from dropless.parallel import checkpoint as ckpt

SHARD = "__0_0.distcp"
EMBED = "model.embed.weight"


def _saved(tmp_path: Path, optimizer: bool = False):
    """A checkpoint of `tiny` (with AdamW's state when `optimizer`), and a model to load it into
    (and its optimizer)."""
    model = Transformer(PRESETS["tiny"])
    opt = torch.optim.AdamW(model.parameters()) if optimizer else None
    path = ckpt.save(tmp_path / "run", 1, model, opt)
    other = Transformer(PRESETS["tiny"])
    return path, other, torch.optim.AdamW(other.parameters()) if optimizer else None


def _metadata(path: Path):
    return dcp.FileSystemReader(path).read_metadata()   # a test's own file: plain pickle


def _replace_item(path: Path, fqn: str, blob) -> None:
    """Forge the shard with the item of `fqn` replaced by `blob(old item)`, every item moved to
    its new offset in `.metadata`."""
    metadata, shard = _metadata(path), (path / SHARD).read_bytes()
    out = bytearray()
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[1].offset):
        item = shard[info.offset:info.offset + info.length]
        item = blob(item) if index.fqn == fqn else item
        info.offset, info.length = len(out), len(item)
        out += item
    forge(path, SHARD, bytes(out))
    forge(path, ".metadata", pickle.dumps(metadata))


def _rezip(item: bytes, compression: int, grow: int = 0) -> bytes:
    """The torch.save zip `item` rewritten with `compression`, its storage grown by `grow` zero
    bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(item)) as old, zipfile.ZipFile(out, "w") as new:
        for entry in old.infolist():
            data = old.read(entry)
            data += bytes(grow) if entry.filename.endswith("/data/0") else b""
            new.writestr(entry.filename, data, compress_type=compression)
    return out.getvalue()


# ---- .metadata names only the manifest's shards, and items inside them -------------------------

@pytest.mark.timeout(60)   # a FIFO blocked the load forever
@pytest.mark.parametrize("kind", ["elsewhere", "fifo", "dev-zero"])
def test_metadata_naming_a_file_the_manifest_lacks_is_refused(tmp_path, kind):
    """`.metadata` names a file beside it that the manifest does not list (so no checksum covers
    it): a link to a shard outside the directory (it loaded), a FIFO (the load blocked), or a
    link to /dev/zero (a value's length read that many bytes)."""
    path, other, _ = _saved(tmp_path)
    if kind == "elsewhere":
        shutil.copy(path / SHARD, tmp_path / "outside.distcp")
        (path / "other.distcp").symlink_to(tmp_path / "outside.distcp")
    elif kind == "fifo":
        os.mkfifo(path / "other.distcp")
    else:
        (path / "other.distcp").symlink_to("/dev/zero")
    metadata = _metadata(path)
    for info in metadata.storage_data.values():
        info.relative_path = "other.distcp"
    forge(path, ".metadata", pickle.dumps(metadata))
    with pytest.raises(DroplessError, match=f"^{path / '.metadata'}: names 'other.distcp', not "
                                            "a file of its checkpoint directory"):
        ckpt.load(path, other)


@pytest.mark.parametrize("field,value", [("offset", 10**9), ("length", 2**40)])
def test_an_item_past_the_end_of_its_shard_is_refused(tmp_path, field, value):
    path, other, _ = _saved(tmp_path)
    metadata = _metadata(path)
    info = next(info for index, info in metadata.storage_data.items() if index.fqn == EMBED)
    setattr(info, field, value)
    forge(path, ".metadata", pickle.dumps(metadata))
    with pytest.raises(DroplessError, match=f"^{path / '.metadata'}: an item at bytes .* of "
                                            f"{SHARD} runs past the end of the file"):
        ckpt.load(path, other)


# ---- .metadata: opcodes and size bounded before it is unpickled ---------------------------------

@pytest.mark.parametrize("ops,message", [
    (b"\x8f" * 1000, "pickle opcode EMPTY_SET is not DCP metadata's"),   # 1 byte: a 216-byte set
    (b"}" * 100_000, "over [0-9,]+ pickle opcodes, more than the metadata of the model")],
    ids=["sets", "dicts"])
def test_metadata_pickle_that_inflates_is_refused_unpickled(tmp_path, ops, message):
    """A list of empty sets (an opcode DCP's metadata never uses), or of more empty dicts (which
    it uses) than a checkpoint of this model can need: 2 MB of sets unpickled to 430 MB, of dicts
    to 140 MB."""
    path, other, _ = _saved(tmp_path)
    forge(path, ".metadata", b"\x80\x04](" + ops + b"e.")
    with pytest.raises(DroplessError, match=f"^{path / '.metadata'}: not a DCP metadata file "
                                            f"\\({message}"):
        ckpt.load(path, other)


def test_metadata_larger_than_the_model_can_need_is_refused_unhashed(tmp_path, monkeypatch):
    """The cap on `.metadata` follows the model (~290 KB for `tiny`), not a flat 1 GiB."""
    path, other, _ = _saved(tmp_path)
    with open(path / ".metadata", "ab") as f:
        f.truncate(2**20)
    monkeypatch.setattr(ckpt, "_sha256", lambda file: pytest.fail(f"{file} was hashed"))
    with pytest.raises(DroplessError, match=f"^{path / '.metadata'}: 1,048,576 bytes, over the "
                                            "[0-9,]+ that DCP's metadata of the model"):
        ckpt.load(path, other)


# ---- items: uncompressed zips of the sizes their metadata says ---------------------------------

def test_a_deflated_item_is_refused_before_it_inflates(tmp_path):
    """The embedding's item deflated, with 16 MiB of zeros for a storage: 16 KB on disk. torch
    inflated it whole before finding it too large; a bomb of 262 KB inflated to 256 MiB."""
    path, other, _ = _saved(tmp_path)
    _replace_item(path, EMBED, lambda item: _rezip(item, zipfile.ZIP_DEFLATED, grow=2**24))
    with pytest.raises(DroplessError, match=f"^{path / SHARD}: the item at byte [0-9,]+ holds "
                                            "compressed entries"):
        ckpt.load(path, other)


def test_an_item_with_more_bytes_than_its_tensor_chunk_is_refused(tmp_path):
    """Checked against the chunk `.metadata` describes before it is read (torch 2.13 refuses a
    storage larger than its tensor's pickle says only once it has read it)."""
    path, other, _ = _saved(tmp_path)
    _replace_item(path, EMBED, lambda item: _rezip(item, zipfile.ZIP_STORED, grow=4096))
    numel = other.embed.weight.numel()
    with pytest.raises(DroplessError, match=f"^{path / SHARD}: the item at byte [0-9,]+ holds "
                                            f"{4 * numel + 4096:,} bytes of tensor data, not "
                                            f"the {4 * numel:,} of the tensor chunk"):
        ckpt.load(path, other)


def test_a_value_larger_than_the_model_can_need_is_refused(tmp_path):
    """A learning rate that is a list of 100k empty dicts: 200 KB pickled, 6 MB unpickled."""
    path, other, opt = _saved(tmp_path, optimizer=True)
    lr = io.BytesIO()
    torch.save([{} for _ in range(100_000)], lr)
    _replace_item(path, "optim.param_groups.0.lr", lambda item: lr.getvalue())
    with pytest.raises(DroplessError, match=f"^{path / SHARD}: the item at byte [0-9,]+ holds "
                                            "a pickled value of [0-9,]+ bytes, over the"):
        ckpt.load(path, other, opt)


# ---- the run directory's lock ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_lock_file_is_refused_untouched(tmp_path, kind):
    """A `.lock` linking to a user's file would be truncated and overwritten with a PID by
    `train --resume`; a FIFO is no lock either. Both are refused, and the file stays as it was."""
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    if kind == "symlink":
        (run / LOCK).symlink_to(victim)
    else:
        os.mkfifo(run / LOCK)
    with pytest.raises(DroplessError, match=f"^{run / LOCK}: not a regular file"):
        with claim_run_dir(run, new=False):
            pytest.fail("claimed")
    assert victim.read_text() == "precious\n"
