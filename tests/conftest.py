import os
import sysconfig
from pathlib import Path

import pytest
import torch

from dropless.config import TrainConfig


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The models here are tiny: one thread avoids OpenMP spin-waits on a busy 2-core machine
    (subprocesses get OMP_NUM_THREADS=1 through `subprocess_env`)."""
    torch.set_num_threads(1)


def subprocess_env() -> dict:
    repo = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """~250 KB of Python source in a few files: a quick stand-in for the full stdlib corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "dataclasses.py", "textwrap.py", "shlex.py", "fnmatch.py",
                 "glob.py", "heapq.py", "bisect.py", "string.py", "colorsys.py"):
        (folder / name).write_text((root / name).read_text())
    return folder


@pytest.fixture
def small_cfg(tmp_path, corpus):
    """A TrainConfig for fast CPU tests: the tiny preset on short sequences and small batches."""
    def make(**kw) -> TrainConfig:
        base = dict(out=str(tmp_path / "run"), data=str(corpus), cache_dir=str(tmp_path / "cache"),
                    steps=6, batch_size=4, seq_len=32, warmup=2, eval_every=3, eval_batches=1,
                    ckpt_every=100, log_every=1, sample_tokens=8)
        return TrainConfig(**{**base, **kw})
    return make
