"""dropless: dropless Mixture-of-Experts training and inference on PyTorch."""

import os as _os

# this process's parent when dropless is first imported, read before torch's import (seconds): a
# torchrun worker's launcher watchdog (parallel/runtime.py) watches this pid, so that a launcher
# that died during those seconds is noticed too (the parent read later is already its adopter)
STARTED_BY = _os.getppid()

from dropless.config import PRESETS, MoEConfig, ModelConfig, TrainConfig, get_preset
from dropless.errors import DroplessError

# what imports torch (seconds) loads on first use: `python -m dropless` imports this package before
# its entry point (__main__.py) can catch a Ctrl-C, so that must be quick
_LAZY = {"MoE": "moe", "MoEAux": "moe", "ModelAux": "model", "Transformer": "model",
         "from_hf": "hf", "to_hf": "hf"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dropless' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"dropless.{_LAZY[name]}"), name)


__all__ = ["from_hf", "to_hf", "MoE", "MoEAux", "ModelAux", "Transformer", "MoEConfig", "ModelConfig",
           "TrainConfig", "DroplessError", "PRESETS", "get_preset"]
__version__ = "0.1.0"
