"""Checkpoints and run directories from strangers: a forged file is one clear error naming it,
before it can make the loader read outside its directory, block, run code or allocate without
bounds. Forged files are built small (a few KB), however much they would make a loader read."""

import os

import pytest

from dropless.checkpoint import LOCK, claim_run_dir
from dropless.errors import DroplessError


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
