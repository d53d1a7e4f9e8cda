"""tokenswift: lossless acceleration of ultra-long LLM generation (TokenSwift)."""

from .api import LM, GenerationResult, load
from .config import PAPER_SAMPLING, ModelConfig, RopeScaling, SamplingConfig

__all__ = ["load", "LM", "GenerationResult", "ModelConfig", "RopeScaling", "SamplingConfig", "PAPER_SAMPLING"]
__version__ = "0.1.0"
