"""Encoders built on timm: FastViTHD and the small hybrid (MobileCLIP MCi0), CLIP ViT-L/14 native and tiled.

Notation: B images, H x W pixels, C channels, h x w feature grid, n tiles per image.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F

from fovea.config import VisionConfig
from fovea.vision.base import Encoder, register_encoder


class TimmHybrid(Encoder):
    """A timm FastViT-family hybrid: convolutional stages downsample, attention runs only on the last, small grid."""

    channels_last = True

    def __init__(self, *, arch: str, stride: int, overrides: dict, low_precision: str = "weights") -> None:
        super().__init__()
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
        self.stride = stride
        self.low_precision = low_precision
        self.channels = self.model.num_features

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        return self.model.forward_features(pixels)  # (B,3,H,W) -> (B,C,H/stride,W/stride)

    def reparameterize(self) -> dict:
        from timm.utils.model import reparameterize_model

        reparameterize_model(self.model, inplace=True)
        return {"inference_mode": True}  # how timm builds the fused form directly (FastVLM checkpoints use it)


@register_encoder("fastvithd")
def fastvithd(cfg: VisionConfig) -> Encoder:
    """FastViTHD (timm ``fastvit_mci3``): stride 64, 3072 channels, the FastVLM encoder."""
    return TimmHybrid(arch="fastvit_mci3", stride=64, overrides=dict(cfg.overrides))


@register_encoder("fastvit-mci0")
def fastvit_mci0(cfg: VisionConfig) -> Encoder:
    """MobileCLIP MCi0 (timm ``fastvit_mci0``): a small hybrid for CPU work, stride 32, 1024 channels."""
    return TimmHybrid(arch="fastvit_mci0", stride=32, overrides=dict(cfg.overrides), low_precision="autocast")


def _clip_vit(cfg: VisionConfig, img_size: int):
    overrides = {"img_size": img_size, **cfg.overrides}
    model = timm.create_model(
        "vit_large_patch14_clip_quickgelu_336", pretrained=False, num_classes=0, dynamic_img_size=True,
        **overrides,
    )
    depth = len(model.blocks)
    layer = cfg.feature_layer % depth
    # Blocks after the chosen layer (and the final norm/head) are never used: drop them, they cost time.
    model.prune_intermediate_layers(indices=[layer], prune_norm=True, prune_head=True)
    return model, layer


class ViT(Encoder):
    """CLIP ViT-L/14 at the image's own resolution (position embeddings interpolated): cost grows with (h*w)^2."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.model, self.layer = _clip_vit(cfg, cfg.tile_size)
        self.stride = self.model.patch_embed.patch_size[0]
        self.channels = self.model.num_features

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        # Patch tokens of the chosen block, CLS dropped: (B,3,H,W) -> (B,C,H/14,W/14).
        return self.model.forward_intermediates(pixels, indices=[self.layer], intermediates_only=True)[0]


class TiledViT(Encoder):
    """LLaVA-NeXT AnyRes: the image, resized to fit a pinpoint of whole tiles and padded as the preprocessing says,
    is cut into ``tile`` px crops; a base view (the whole original image squashed to one tile, as LLaVA-NeXT's
    processor makes it) comes with it; every view goes through the ViT at its native size.

    Input layout (what ``compose`` builds from an image): the pinpoint canvas of rows x cols tiles, then one more
    tile row whose first tile is the base view: (3, (rows + 1) * t, cols * t).
    Output layout: the crops' grids laid side by side in raster order, the base view last:
    (B, C, g, g * (n + 1)) with g = tile / patch and n = rows * cols. Compressors that pool spatially therefore see
    crop boundaries, which is the nature of this baseline; the ``llava_next`` connector restores LLaVA-NeXT's order.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.model, self.layer = _clip_vit(cfg, cfg.tile_size)
        self.tile = cfg.tile_size
        self.patch = self.model.patch_embed.patch_size[0]
        if self.tile % self.patch:
            raise ValueError(f"tile size {self.tile} is not a multiple of the patch size {self.patch}")
        self.stride = self.tile  # inputs are whole tiles
        self.channels = self.model.num_features
        self.pinpoints = tuple(tuple(p) for p in cfg.pinpoints)
        for ph, pw in self.pinpoints:
            if ph % self.tile or pw % self.tile:
                raise ValueError(f"pinpoint {pw}x{ph} (WxH) is not a multiple of the tile size {self.tile}")

    def _tiles(self, height: int, width: int) -> tuple[int, int]:
        rows, cols = height // self.tile - 1, width // self.tile  # the last tile row carries the base view
        if rows < 1 or cols < 1:
            raise ValueError(f"AnyRes input {width}x{height} (WxH) has no crop row above its base-view row "
                             f"(tile {self.tile}); build it with ImageProcessor / TiledViT.compose")
        return rows, cols

    def grid(self, height: int, width: int) -> tuple[int, int]:
        g = self.tile // self.patch
        rows, cols = self._tiles(height, width)
        return g, g * (rows * cols + 1)

    def input_size(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        th, tw = self.canvas_size(height, width)
        return th + self.tile, tw

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        from fovea.preprocess.anyres import select_best_resolution

        return select_best_resolution((height, width), self.pinpoints)

    def resized_content(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        th, tw = self.canvas_size(height, width)
        scale = min(th / height, tw / width)
        return min(th, math.ceil(height * scale)), min(tw, math.ceil(width * scale))

    def compose(self, image, content: tuple[int, int], size: tuple[int, int], cfg) -> torch.Tensor:
        """The input tensor for one decoded image: the padded canvas (``size`` is the canvas), then the base-view
        row."""
        from fovea.preprocess.image import to_tensor

        canvas = self.canvas_size(image.height, image.width)
        pixels = to_tensor(image, content=content, size=canvas, cfg=cfg)  # (3,H,W)
        base = to_tensor(image, content=(self.tile, self.tile), size=(self.tile, self.tile), cfg=cfg)  # (3,t,t)
        strip = F.pad(base, (0, canvas[1] - self.tile))  # (3,t,W); right of the base view is never read
        return torch.cat([pixels, strip], dim=1)  # (3,H+t,W)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        b, _, height, width = pixels.shape
        (rows, cols), t = self._tiles(height, width), self.tile
        canvas, base = pixels[:, :, : rows * t], pixels[:, :, rows * t:, :t]  # (B,3,rows*t,cols*t), (B,3,t,t)
        # (B,3,rows*t,cols*t) -> (B*rows*cols,3,t,t), crops in raster order
        crops = canvas.unfold(2, t, t).unfold(3, t, t)  # (B,3,rows,cols,t,t)
        crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(b, rows * cols, 3, t, t)
        views = torch.cat([crops, base[:, None]], dim=1)  # (B,n+1,3,t,t)
        feats = self.model.forward_intermediates(views.flatten(0, 1), indices=[self.layer], intermediates_only=True)[0]
        g = t // self.patch
        # (B*(n+1),C,g,g) -> (B,C,g,(n+1)*g): views side by side along the width
        feats = feats.reshape(b, rows * cols + 1, self.channels, g, g).permute(0, 2, 3, 1, 4)
        return feats.reshape(b, self.channels, g, (rows * cols + 1) * g)


@register_encoder("vit-l14-336")
def vit_l14_336(cfg: VisionConfig) -> Encoder:
    """OpenAI CLIP ViT-L/14-336 (timm ``vit_large_patch14_clip_quickgelu_336``, QuickGELU as in LLaVA's tower),
    dynamic image size: the plain-ViT baseline."""
    return ViT(cfg)


@register_encoder("vit-l14-336-anyres")
def vit_l14_336_anyres(cfg: VisionConfig) -> Encoder:
    """CLIP ViT-L/14 over AnyRes 336 px tiles plus a thumbnail: the LLaVA-NeXT baseline."""
    return TiledViT(cfg)


# The reading encoder: MCi0's blocks at stride 16 (the last stage keeps the stride-16 grid instead of halving it), so
# each cell covers about one character at body-text size after a 2880 px page is resized to 1536 px. Convolutional
# stages to stride 16, then attention over that grid, then a 512-channel 3x3 projection.
READER_ARCH = dict(
    layers=(2, 4, 8, 2),
    embed_dims=(64, 128, 256, 256),
    downsamples=(False, True, True, False),
)


@register_encoder("fovea-reader")
def fovea_reader(cfg: VisionConfig) -> Encoder:
    """fovea's reading hybrid (timm FastViT blocks): convolutions to stride 16, attention on the stride-16 grid,
    512 channels; pretrained on rendered text by ``fovea pretrain``."""
    return TimmHybrid(arch="fastvit_mci0", stride=16, overrides={**READER_ARCH, **cfg.overrides},
                      low_precision="autocast")
