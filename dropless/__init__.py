"""dropless: dropless Mixture-of-Experts training and inference on PyTorch."""

import os as _os

# this process's parent when dropless is first imported, read before torch's import (seconds): a
# torchrun worker's launcher watchdog (parallel/runtime.py) watches this pid, so that a launcher
# that died during those seconds is noticed too (the parent read later is already its adopter)
STARTED_BY = _os.getppid()

from dropless.config import PRESETS, MoEConfig, ModelConfig, TrainConfig, get_preset
from dropless.errors import DroplessError
from dropless.moe import MoE, MoEAux
from dropless.model import ModelAux, Transformer
from dropless.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf", "MoE", "MoEAux", "ModelAux", "Transformer", "MoEConfig", "ModelConfig",
           "TrainConfig", "DroplessError", "PRESETS", "get_preset"]
__version__ = "0.1.0"
