"""fovea: fast vision-language models for high-resolution documents."""

from fovea.config import ConnectorConfig, LMConfig, PreprocessConfig, VisionConfig, VLMConfig, preset
from fovea.model import VLM

__version__ = "0.1.0"
__all__ = ["VLM", "ConnectorConfig", "LMConfig", "PreprocessConfig", "VLMConfig", "VisionConfig", "preset"]
