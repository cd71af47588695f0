"""Image loading with limits, and resizing to an encoder's input size.

Notation: H x W pixels; tensors are (3, H, W) float, normalised.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fovea.config import DEFAULT_MAX_PIXELS, PreprocessConfig

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(
            f"image of {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} pixels"
        )


def load_image(source: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes, a PIL image or an (H, W[, C]) uint8 array as RGB.

    The size is checked against ``max_pixels`` from the header, before any pixel is decoded; Pillow's own
    decompression-bomb guard is turned into the same ``ValueError``.
    """
    if isinstance(source, Image.Image):
        check_pixels(source.width, source.height, max_pixels)
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ValueError("image bytes are empty")
        stream, label = io.BytesIO(bytes(source)), f"{len(source)} bytes"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"image file {str(path)!r} does not exist")
        stream, label = path.open("rb"), repr(str(path))
    else:
        raise ValueError(f"cannot read an image from {type(source).__name__}; pass a path, bytes, PIL image or array")
    with stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
                check_pixels(image.width, image.height, max_pixels)
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"image {label} is a decompression bomb: {err}") from None
        except UnidentifiedImageError:
            raise ValueError(f"image {label} is not a recognised image format") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"image {label} is corrupt or truncated: {err}") from None
        return image.convert("RGB")


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    check_pixels(array.shape[1], array.shape[0], max_pixels)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = (array * 255.0).round()
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array[:, :, :3], mode="RGB")


def to_tensor(image: Image.Image, *, content: tuple[int, int], size: tuple[int, int], cfg: PreprocessConfig):
    """Resize ``image`` to ``content`` (h, w), pad to ``size`` (H, W) at the end (bottom/right) or centred, as
    ``cfg.pad_position`` says, normalise: (3, H, W) float32."""
    import torch  # here, not at the top: checking a file's image (load_image) must not wait for torch to import
    import torch.nn.functional as F

    ch, cw = content
    height, width = size
    if (image.height, image.width) != (ch, cw):
        image = image.resize((cw, ch), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3,h,w)
    if cfg.pad_position not in ("end", "center"):
        raise ValueError(f"pad_position must be 'end' or 'center', got {cfg.pad_position!r}")
    top, left = ((height - ch) // 2, (width - cw) // 2) if cfg.pad_position == "center" else (0, 0)
    pad = (left, width - cw - left, top, height - ch - top)
    pixels = F.pad(pixels, pad, value=cfg.pad_value)  # (3,h,w) -> (3,H,W)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (pixels - mean) / std
