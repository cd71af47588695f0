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

    def __init__(self, *, arch: str, stride: int, overrides: dict) -> None:
        super().__init__()
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
        self.stride = stride
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
    return TimmHybrid(arch="fastvit_mci0", stride=32, overrides=dict(cfg.overrides))


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
    """LLaVA-NeXT AnyRes: the image (resized to a pinpoint of whole tiles) is cut into ``tile`` px crops, plus one
    thumbnail of the whole image; every crop goes through the ViT at its native size.

    Output layout: the crops' grids laid side by side in raster order, the thumbnail last:
    (B, C, g, g * (n + 1)) with g = tile / patch. Compressors that pool spatially therefore see crop boundaries,
    which is the nature of this baseline; it is meant to be paired with a 1:1 connector.
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
                raise ValueError(f"pinpoint {ph}x{pw} is not a multiple of the tile size {self.tile}")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        g = self.tile // self.patch
        n = (height // self.tile) * (width // self.tile)
        return g, g * (n + 1)

    def input_size(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        from fovea.preprocess.anyres import select_best_resolution

        return select_best_resolution((height, width), self.pinpoints)

    def resized_content(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        th, tw = self.input_size(height, width, max_side, upscale)
        scale = min(th / height, tw / width)
        return min(th, math.ceil(height * scale)), min(tw, math.ceil(width * scale))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_input(pixels)
        b, _, height, width = pixels.shape
        rows, cols, t = height // self.tile, width // self.tile, self.tile
        # (B,3,rows*t,cols*t) -> (B*rows*cols,3,t,t), crops in raster order
        crops = pixels.unfold(2, t, t).unfold(3, t, t)  # (B,3,rows,cols,t,t)
        crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(b * rows * cols, 3, t, t)
        thumb = F.interpolate(pixels, size=(t, t), mode="bilinear", align_corners=False, antialias=True)  # (B,3,t,t)
        views = torch.cat([crops.reshape(b, rows * cols, 3, t, t), thumb[:, None]], dim=1)  # (B,n+1,3,t,t)
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
