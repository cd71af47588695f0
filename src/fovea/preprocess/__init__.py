"""Image loading, limits, resizing to the encoder stride, AnyRes tiling, and the prompt processor."""

from fovea.preprocess.anyres import grid_pinpoints, num_tiles, select_best_resolution
from fovea.preprocess.image import check_pixels, load_image, to_tensor
from fovea.preprocess.processor import ImageProcessor, PreparedImage, Processor, Prompt, message_text

__all__ = [
    "ImageProcessor", "PreparedImage", "Processor", "Prompt", "check_pixels", "grid_pinpoints", "load_image",
    "message_text", "num_tiles", "select_best_resolution", "to_tensor",
]
