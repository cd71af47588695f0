"""Loading checkpoints written by transformers: one converter per ``model_type``, one contract.

A converter reads a local directory and returns a ``Converted``: the fovea config, the LLM's config, the tokenizer
and every weight under fovea's names, with the checkpoint's image preprocessing, chat template and licence.
``fovea.checkpoint.load_model`` builds the VLM from it (strict: a missing, unexpected or misshapen key is a ValueError
naming it). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fovea.interop.common import Converted, read_config
from fovea.registry import Registry

Converter = Callable[[Path, dict], Converted]
_CONVERTERS: Registry[Converter] = Registry("converter for model_type")


def register_converter(*model_types: str) -> Callable[[Converter], Converter]:
    return _CONVERTERS.register(*model_types)


def supported_model_types() -> list[str]:
    return _CONVERTERS.names()


def convert_checkpoint(path: str | Path) -> Converted:
    """A transformers checkpoint directory -> its parts in fovea's terms."""
    path = Path(path)
    config = read_config(path)
    kind = config.get("model_type")
    if kind not in _CONVERTERS:
        raise ValueError(f"{str(path)!r} holds a {kind!r} checkpoint; fovea converts {supported_model_types()} "
                         "and its own directories")
    return _CONVERTERS.get(kind)(path, config)


from fovea.interop import fastvlm as _fastvlm  # noqa: E402,F401  (registers fast_vlm)
from fovea.interop import llava as _llava  # noqa: E402,F401  (registers llava, llava_next)

__all__ = ["Converted", "convert_checkpoint", "register_converter", "supported_model_types"]
