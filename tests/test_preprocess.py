"""Image loading, limits and resizing; AnyRes against transformers' own implementation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fovea.config import PreprocessConfig
from fovea.preprocess import ImageProcessor, grid_pinpoints, load_image, num_tiles, select_best_resolution
from fovea.vision import build_encoder


def _png(width: int, height: int, color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def test_load_from_every_source(tmp_path):
    data = _png(30, 20, "red")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    array[..., 0] = 255
    for source in (str(path), path, data, Image.open(io.BytesIO(data)), array, array.astype(np.float32) / 255.0):
        img = load_image(source)
        assert img.size == (30, 20) and img.mode == "RGB"
        assert img.getpixel((5, 5)) == (255, 0, 0)
    gray = load_image(np.full((4, 6), 7, dtype=np.uint8))
    assert gray.getpixel((0, 0)) == (7, 7, 7)


def test_pixel_limit_names_the_numbers():
    with pytest.raises(ValueError, match=r"image of 300x200 = 60,000 pixels exceeds the limit of 50,000 pixels"):
        load_image(_png(300, 200), max_pixels=50_000)
    with pytest.raises(ValueError, match=r"exceeds the limit of 100 pixels"):
        load_image(np.zeros((20, 30, 3), dtype=np.uint8), max_pixels=100)


def test_decompression_bomb_becomes_value_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(_png(40, 40), max_pixels=10**9)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "image bytes are empty"),
        (b"this is not an image at all", "not a recognised image format"),
        (_png(64, 64)[:80], "corrupt or truncated"),
    ],
)
def test_bad_bytes_are_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        load_image(data)


def test_missing_file_and_wrong_type():
    with pytest.raises(ValueError, match="does not exist"):
        load_image("/no/such/file.png")
    with pytest.raises(ValueError, match="cannot read an image from int"):
        load_image(42)
    with pytest.raises(ValueError, match=r"image array must be .* got shape \(2, 2, 2, 2\)"):
        load_image(np.zeros((2, 2, 2, 2), dtype=np.uint8))


@pytest.mark.parametrize("encoder", ["fastvithd", "vit-l14-336"])
def test_resize_keeps_aspect_and_pads_to_stride(encoder):
    enc = build_encoder(tiny_config(encoder).vision)
    proc = ImageProcessor(encoder=enc, cfg=PreprocessConfig(max_side=512, upscale=False))
    prepared = proc(Image.new("RGB", (2880, 2160), "black"))
    height, width = prepared.pixels.shape[-2:]
    assert height % enc.stride == 0 and width % enc.stride == 0
    ch, cw = prepared.content_size
    assert max(ch, cw) == 512 and abs(cw / ch - 2880 / 2160) < 0.01
    assert height - ch < enc.stride and width - cw < enc.stride
    # Content is black (0), the stride padding is white (1).
    assert prepared.pixels[:, :ch, :cw].abs().max() == 0
    if height > ch:
        assert torch.all(prepared.pixels[:, ch:, :] == 1)
    small = proc(Image.new("RGB", (100, 50)))  # no upscaling unless asked
    assert small.content_size == (50, 100)


def test_anyres_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoints = grid_pinpoints(336, 4)
    for size in [(2160, 2880), (2880, 2160), (336, 336), (100, 1000), (4000, 300), (1024, 1024)]:
        assert select_best_resolution(size, pinpoints) == tuple(hf_select(size, [list(p) for p in pinpoints]))


def test_anyres_tiles_and_tokens():
    from fovea.config import LLAVA_NEXT_PINPOINTS

    assert select_best_resolution((2160, 2880), LLAVA_NEXT_PINPOINTS) == (672, 672)
    assert num_tiles((2160, 2880), LLAVA_NEXT_PINPOINTS, 336) == 4
    assert num_tiles((2160, 2880), grid_pinpoints(336, 6), 336) == 30
    enc = build_encoder(tiny_config("vit-l14-336-anyres").vision)
    proc = ImageProcessor(encoder=enc, cfg=PreprocessConfig())
    image = Image.new("RGB", (90, 30), "red")
    pixels = proc(image).pixels  # wide: picks the 28x84 pinpoint -> 3 crops, then a base-view row
    assert pixels.shape[-2:] == (28 + 28, 84)
    assert enc.num_tokens(56, 84) == (3 + 1) * 4  # crops + base view, 2x2 patches each
    assert enc.features(pixels[None]).shape[-2:] == enc.grid(56, 84)
    # The base view is the whole image squashed to one tile (no padding in it), as LLaVA-NeXT's processor makes it.
    assert torch.allclose(pixels[:, 28:, :28], proc.__class__(encoder=enc, cfg=PreprocessConfig())(
        image.resize((28, 28))).pixels[:, 28:, :28])
    assert pixels[0, 28:, :28].std() < 1e-6 and pixels[0, 28:, :28].mean() > 0.9  # all red, no white padding
    with pytest.raises(ValueError, match="no crop row above its base-view row"):
        enc.grid(28, 84)
