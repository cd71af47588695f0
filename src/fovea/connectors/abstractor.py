"""Honeybee's C-Abstractor: convolutions keep locality, adaptive pooling sets the budget.

Notation: B images, C channels, h x w grid, E connector width, qh x qw output grid, Q = qh*qw, D LLM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fovea.config import ConnectorConfig
from fovea.connectors.base import Connector, budget_grid, check_features, register_connector, sincos_2d


class ResBlock(nn.Module):
    """Bottleneck residual block with squeeze-excitation (RegNet-style, as in Honeybee), on (B,E,h,w)."""

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        mid = max(out_dim // 2, 8)
        self.reduce = nn.Conv2d(in_dim, mid, 1, bias=False)
        self.norm1 = nn.GroupNorm(1, mid)
        self.conv = nn.Conv2d(mid, mid, 3, padding=1, groups=max(mid // 64, 1), bias=False)
        self.norm2 = nn.GroupNorm(1, mid)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, max(mid // 4, 4), 1), nn.SiLU(),
                                nn.Conv2d(max(mid // 4, 4), mid, 1), nn.Sigmoid())
        self.expand = nn.Conv2d(mid, out_dim, 1, bias=False)
        self.norm3 = nn.GroupNorm(1, out_dim)
        self.shortcut = nn.Conv2d(in_dim, out_dim, 1, bias=False) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm1(self.reduce(x)))
        y = F.silu(self.norm2(self.conv(y)))
        y = self.norm3(self.expand(y * self.se(y)))
        return F.silu(y + self.shortcut(x))


class CAbstractor(Connector):
    """Residual conv blocks, adaptive average pooling to qh x qw, more conv blocks, an MLP readout: (B,Q,D).
    Non-square output grids are fine (e.g. 8x16 for a 128-token budget)."""

    def __init__(
        self, *, in_channels: int, out_dim: int, dim: int, grid: tuple[int, int], depth: int,
        position_encoding: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.grid, self.position_encoding = in_channels, grid, position_encoding
        self.stage1 = nn.Sequential(*(ResBlock(in_dim=in_channels if i == 0 else dim, out_dim=dim)
                                      for i in range(depth)))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.stage2 = nn.Sequential(*(ResBlock(in_dim=dim, out_dim=dim) for _ in range(depth)))
        self.readout = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, features, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels)
        b, c, h, w = features.shape
        if self.position_encoding:
            pos = sincos_2d(h, w, c, device=features.device, dtype=features.dtype)  # (h*w,C)
            features = features + pos.T.reshape(1, c, h, w)  # (h*w,C) -> (1,C,h,w)
        x = self.stage2(self.pool(self.stage1(features)))  # (B,C,h,w) -> (B,E,h,w) -> (B,E,qh,qw)
        return self.readout(x.flatten(2).transpose(1, 2))  # (B,E,qh,qw) -> (B,Q,E) -> (B,Q,D)

    @property
    def budget(self) -> int:
        return self.grid[0] * self.grid[1]

    def num_output_tokens(self, h: int, w: int) -> int:
        return self.budget


@register_connector("c_abstractor")
def c_abstractor(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return CAbstractor(
        in_channels=in_channels, out_dim=out_dim, dim=cfg.hidden_size or out_dim,
        grid=budget_grid(cfg.num_queries, cfg.grid), depth=cfg.num_layers, position_encoding=cfg.position_encoding,
    )
