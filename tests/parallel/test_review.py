"""Scale-out failures an adversarial review found: what a distributed checkpoint save does when the
disk refuses its shards (one error naming the checkpoint on every rank, no traceback, nothing left
behind, the previous checkpoint whole), and a malformed or forged manifest refused in one line."""

import json
import resource

import pytest
import torch

from _dist import launch
from dropless import ModelConfig, MoEConfig, Transformer
from dropless.errors import DroplessError
from dropless.parallel import ParallelConfig, build_mesh, parallelize
from dropless.parallel import checkpoint as ckpt

CFG = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                  moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2))


def save_on_a_full_disk(run_dir: str, model) -> None:
    """Save step 1, then step 2 with every file capped at 16 KB (as a full disk: writes fail with
    EFBIG, Python ignores SIGXFSZ)."""
    ckpt.save(run_dir, 1, model)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(DroplessError, match="step 2 could not be written") as refusal:
            ckpt.save(run_dir, 2, model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "previous checkpoint" in str(refusal.value) and "\n" not in str(refusal.value)


def full_disk_body(rank, world, run_dir):
    torch.manual_seed(0)
    model = parallelize(Transformer(CFG), build_mesh(ParallelConfig(ep=2)))
    save_on_a_full_disk(run_dir, model)


def assert_previous_checkpoint_whole(run_dir) -> None:
    assert [p.name for p in (run_dir / ckpt.DCP_DIR).iterdir()] == ["step-00000001"]  # no .tmp
    ckpt.load(ckpt.latest(run_dir), Transformer(CFG))


@pytest.mark.timeout(120)
def test_a_save_the_disk_refuses_is_one_error_and_leaves_the_previous_checkpoint(tmp_path):
    """dcp.save's CheckpointException (a traceback per rank, wrapping torch's zip writer's 'unexpected
    pos') escaped `dropless train`, and the half-written temp directory stayed on the full disk."""
    torch.manual_seed(0)
    save_on_a_full_disk(str(tmp_path / "one"), Transformer(CFG))
    assert_previous_checkpoint_whole(tmp_path / "one")
    launch(2, full_disk_body, str(tmp_path / "two"))
    assert_previous_checkpoint_whole(tmp_path / "two")


@pytest.mark.parametrize("sums", [[".metadata", "__0_0.distcp", "state.json"], ".metadata state.json"])
def test_a_manifest_whose_checksums_are_not_a_mapping_is_refused_in_one_line(tmp_path, sums):
    """A COMPLETE whose "sha256" lists the names (or is one string naming them) passed the name
    checks (`in` a list, a substring) and failed as a TypeError traceback indexing it by name."""
    torch.manual_seed(0)
    path = ckpt.save(tmp_path, 1, Transformer(CFG))
    (path / ckpt.MARKER).write_text(json.dumps({"step": 1, "sha256": sums}))
    with pytest.raises(DroplessError, match="not a checksum manifest"):
        ckpt.load(path, Transformer(CFG))


@pytest.mark.parametrize("name", ["../outside", "sub/x"])
def test_a_manifest_naming_a_file_outside_its_directory_is_refused(tmp_path, name):
    """A forged COMPLETE listing `../outside` next to `outside` had the file beside the checkpoint
    directory hashed as if it were one of its own."""
    torch.manual_seed(0)
    path = ckpt.save(tmp_path, 1, Transformer(CFG))
    manifest = json.loads((path / ckpt.MARKER).read_text())
    target = path / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"x")
    manifest["sha256"].update({name: ckpt._sha256(target), target.name: ckpt._sha256(target)})
    (path / ckpt.MARKER).write_text(json.dumps(manifest))
    with pytest.raises(DroplessError, match="damaged or missing") as refusal:
        ckpt.load(path, Transformer(CFG))
    assert name in str(refusal.value)
