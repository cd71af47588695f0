"""fovea: fast vision-language models for high-resolution documents."""

from fovea.checkpoint import load_model, save_model
from fovea.config import ConnectorConfig, LMConfig, PreprocessConfig, VisionConfig, VLMConfig, preset
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.model import VLM

__version__ = "0.1.0"
__all__ = ["VLM", "ConnectorConfig", "Engine", "EngineConfig", "LMConfig", "PreprocessConfig", "SamplingParams",
           "VLMConfig", "VisionConfig", "load_model", "preset", "save_model"]
