"""The command line's refusals of inputs that once failed late, obscurely or not at all: each one
line on stderr, exit code 1, before anything is written."""

import pytest

from dropless.config import SHAPE_PRESETS
from tests.test_cli import _fails


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_train_refuses_a_shape_only_preset(capsys, tmp_path, preset):
    """A public model's shape (mixtral-8x7b: 47 B parameters) allocated until the OOM killer came,
    leaving an empty run directory: refused before the directory exists."""
    _fails(capsys, ["train", "--out", str(tmp_path / "run"), "--preset", preset],
           f"preset={preset!r} is invalid: it is a public model's shape for `dropless info` and "
           "benchmarks only; trainable: tiny, small, medium")
    assert not (tmp_path / "run").exists()
