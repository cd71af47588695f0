"""1:1 connectors (every feature cell becomes one LLM token) and average pooling to a fixed grid.

Notation: B images, C channels, h x w grid, Q = qh*qw tokens, D LLM width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fovea.config import ConnectorConfig
from fovea.connectors.base import Connector, budget_grid, check_features, register_connector


class Linear(Connector):
    """One linear map per cell (LLaVA-1.0)."""

    def __init__(self, *, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.proj = nn.Linear(in_channels, out_dim)

    def forward(self, features, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels)
        return self.proj(features.flatten(2).transpose(1, 2))  # (B,C,h,w) -> (B,h*w,C) -> (B,h*w,D)

    def num_output_tokens(self, h: int, w: int) -> int:
        return h * w


class MLP(Connector):
    """Two linear layers with a GELU between (LLaVA-1.5 ``mlp2x_gelu``, FastVLM)."""

    def __init__(self, *, in_channels: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, features, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels)
        tokens = features.flatten(2).transpose(1, 2)  # (B,C,h,w) -> (B,h*w,C)
        return self.fc2(F.gelu(self.fc1(tokens)))  # (B,h*w,D)

    def num_output_tokens(self, h: int, w: int) -> int:
        return h * w


class AvgPool(Connector):
    """2-D adaptive average pooling to a qh x qw grid, then the LLaVA MLP: a parameter-light budget."""

    def __init__(self, *, in_channels: int, hidden: int, out_dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.grid = grid
        self.mlp = MLP(in_channels=in_channels, hidden=hidden, out_dim=out_dim)

    def forward(self, features, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels)
        pooled = F.adaptive_avg_pool2d(features, self.grid)  # (B,C,h,w) -> (B,C,qh,qw)
        return self.mlp(pooled)  # (B,Q,D)

    @property
    def budget(self) -> int:
        return self.grid[0] * self.grid[1]

    def num_output_tokens(self, h: int, w: int) -> int:
        return self.budget


class LlavaNext(MLP):
    """LLaVA-NeXT: the MLP per cell, then its AnyRes arrangement. The encoder (``vit-l14-336-anyres``) lays the
    crops' g x g grids side by side with the base view last; the LLM reads the base view first, then the crops
    stitched into one (rows*g, cols*g) grid with the rows and columns that only saw centred padding removed, and a
    learned newline token closing every row."""

    needs_image_size = True

    def __init__(self, *, in_channels: int, hidden: int, out_dim: int) -> None:
        super().__init__(in_channels=in_channels, hidden=hidden, out_dim=out_dim)
        self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))

    @staticmethod
    def _tiles(h: int, w: int, canvas: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of crops, from the grid and the encoder input size, which is (rows + 1) x cols tiles."""
        views = w // h  # crops + the base view, each g x g with g = h
        n = views - 1
        if h * views != w:
            raise ValueError(f"grid {h}x{w} is not an AnyRes layout of {h}x{h} views")
        if n == 0:
            return 0, 0
        for rows in range(1, n + 1):
            cols = n // rows
            if rows * cols == n and (rows + 1) * canvas[1] == canvas[0] * cols:
                return rows, cols
        raise ValueError(f"grid {h}x{w} does not fit an AnyRes input of {canvas[1]}x{canvas[0]} pixels (WxH)")

    @staticmethod
    def _unpadded(height: int, width: int, original: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the content inside a centred-padded height x width grid, computed as
        LLaVA-NeXT does (rounded to 7 decimals, symmetric crop)."""
        oh, ow = original
        if ow / oh > width / height:
            new = int(round(oh * (width / ow), 7))
            pad = (height - new) // 2
            return pad, height - pad, 0, width
        new = int(round(ow * (height / oh), 7))
        pad = (width - new) // 2
        return 0, height, pad, width - pad

    def num_image_tokens(self, h, w, canvas, original):
        rows, cols = self._tiles(h, w, canvas)
        if rows == 0:  # the base view alone, closed by one newline
            return h * h + 1
        top, bottom, left, right = self._unpadded(rows * h, cols * h, original)
        return h * h + (bottom - top) * (right - left + 1)

    def arrange(self, tokens, grid, canvas, original):
        g = grid[0]
        rows, cols = self._tiles(*grid, canvas)
        d = tokens.shape[-1]
        if rows == 0:
            return torch.cat([tokens, self.image_newline.to(tokens.dtype)[None]])  # (g*g+1,D)
        views = tokens.view(g, rows * cols + 1, g, d).transpose(0, 1)  # (g,(n+1)*g,D) -> (n+1,g,g,D)
        base = views[-1].reshape(g * g, d)  # (g*g,D)
        crops = views[:-1].reshape(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
        top, bottom, left, right = self._unpadded(rows * g, cols * g, original)
        crops = crops[top:bottom, left:right]  # (h',w',D)
        newline = self.image_newline.to(crops.dtype).expand(crops.shape[0], 1, d)  # (h',1,D)
        return torch.cat([base, torch.cat([crops, newline], dim=1).reshape(-1, d)])  # (g*g + h'*(w'+1), D)


def _hidden(cfg: ConnectorConfig, out_dim: int) -> int:
    return cfg.hidden_size or out_dim


@register_connector("linear")
def linear(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return Linear(in_channels=in_channels, out_dim=out_dim)


@register_connector("mlp")
def mlp(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return MLP(in_channels=in_channels, hidden=_hidden(cfg, out_dim), out_dim=out_dim)


@register_connector("llava_next")
def llava_next(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return LlavaNext(in_channels=in_channels, hidden=_hidden(cfg, out_dim), out_dim=out_dim)


@register_connector("avgpool")
def avgpool(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    grid = budget_grid(cfg.num_queries, cfg.grid)
    return AvgPool(in_channels=in_channels, hidden=_hidden(cfg, out_dim), out_dim=out_dim, grid=grid)


