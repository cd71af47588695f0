"""Image loading, limits, resizing to the encoder stride, AnyRes tiling, and the prompt processor.

Names resolve on first use, so checking an input (``fovea.preprocess.image.load_image``) does not import torch.
"""

from importlib import import_module

_WHERE = {
    "grid_pinpoints": "anyres", "num_tiles": "anyres", "select_best_resolution": "anyres",
    "check_pixels": "image", "load_image": "image", "to_tensor": "image",
    "ImageProcessor": "processor", "PreparedImage": "processor", "Processor": "processor", "Prompt": "processor",
    "message_text": "processor",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fovea.preprocess' has no attribute {name!r}")
    return getattr(import_module(f"fovea.preprocess.{_WHERE[name]}"), name)
