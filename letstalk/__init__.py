"""LetsTalk: latent diffusion transformer for talking video (model library, pure PyTorch)."""

from .config import PRESETS, LetsTalkConfig
from .transformer import AudioProjection, LetsTalkTransformer, count_parameters

__all__ = ["PRESETS", "LetsTalkConfig", "LetsTalkTransformer", "AudioProjection", "count_parameters"]
__version__ = "0.1.0"
