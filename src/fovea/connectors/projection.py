"""1:1 connectors (every feature cell becomes one LLM token) and average pooling to a fixed grid.

Notation: B images, C channels, h x w grid, Q = qh*qw tokens, D LLM width.
"""

from __future__ import annotations

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

    def forward(self, features, grid=None, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels, grid)
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

    def forward(self, features, grid=None, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels, grid)
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

    def forward(self, features, grid=None, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels, grid)
        pooled = F.adaptive_avg_pool2d(features, self.grid)  # (B,C,h,w) -> (B,C,qh,qw)
        return self.mlp(pooled)  # (B,Q,D)

    def num_output_tokens(self, h: int, w: int) -> int:
        return self.grid[0] * self.grid[1]


def _hidden(cfg: ConnectorConfig, out_dim: int) -> int:
    return cfg.hidden_size or out_dim


@register_connector("linear")
def linear(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return Linear(in_channels=in_channels, out_dim=out_dim)


@register_connector("mlp")
def mlp(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return MLP(in_channels=in_channels, hidden=_hidden(cfg, out_dim), out_dim=out_dim)


@register_connector("avgpool")
def avgpool(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    grid = budget_grid(cfg.num_queries, cfg.grid)
    return AvgPool(in_channels=in_channels, hidden=_hidden(cfg, out_dim), out_dim=out_dim, grid=grid)


