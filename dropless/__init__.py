"""dropless: dropless Mixture-of-Experts training and inference on PyTorch."""

from dropless.config import PRESETS, MoEConfig, ModelConfig, get_preset
from dropless.moe import MoE, MoEAux
from dropless.model import ModelAux, Transformer

__all__ = ["MoE", "MoEAux", "ModelAux", "Transformer", "MoEConfig", "ModelConfig", "PRESETS", "get_preset"]
__version__ = "0.1.0"
