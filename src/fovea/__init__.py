"""fovea: fast vision-language models for high-resolution documents.

Names resolve on first use: ``import fovea`` (and the ``fovea`` command's start, which checks its inputs first)
costs no torch import.
"""

from importlib import import_module

__version__ = "0.1.0"
_WHERE = {
    "VLM": "model", "load_model": "checkpoint", "save_model": "checkpoint",
    "Engine": "engine", "EngineConfig": "engine", "SamplingParams": "engine",
    "ConnectorConfig": "config", "LMConfig": "config", "PreprocessConfig": "config", "VLMConfig": "config",
    "VisionConfig": "config", "preset": "config",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fovea' has no attribute {name!r}")
    return getattr(import_module(f"fovea.{_WHERE[name]}"), name)
