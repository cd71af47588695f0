"""The connector contract and its registry.

Notation: B images, C encoder channels, h x w feature grid, Q output tokens (the budget), D LLM width,
L instruction tokens, E connector width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fovea.config import ConnectorConfig
from fovea.registry import Registry


class Connector(nn.Module):
    """Maps encoder features (B,C,h,w) to LLM tokens (B,Q,D).

    ``num_output_tokens(h, w)`` is the number of tokens for an h x w grid; compressors return their budget whatever
    the grid. ``text_embeds`` (B,L,D) is the instruction, used only by instruction-aware connectors.
    """

    # A Q-Former with its own instruction vocabulary (InstructBLIP's) reads ``text_ids`` in that vocabulary, tokenized
    # by its own tokenizer, instead of the LLM's ``text_embeds``.
    has_own_vocabulary: bool = False
    # Tokens per image whatever the grid, for compressors (Perceiver, Q-Former, C-Abstractor, pooling); None for
    # connectors that give one token per feature cell.
    budget: int | None = None
    # True for connectors whose learned queries cross-attend the grid (Perceiver, Q-Former): ``attention_map`` then
    # says where they looked; the others read every cell once and have no such map.
    has_queries: bool = False

    def forward(
        self,
        features: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def num_output_tokens(self, h: int, w: int) -> int:
        raise NotImplementedError

    def attention_map(self, features: torch.Tensor, text_embeds: torch.Tensor | None = None,
                      text_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """Where the connector looked: (B,h,w), the share of its queries' cross-attention on each feature cell,
        averaged over queries, heads and layers (each map sums to 1). None for connectors without queries, which
        read every cell once (linear, MLP, pooling, C-Abstractor)."""
        return None

    # Connectors whose token layout depends on the image's original size (LLaVA-NeXT's unpadding) set this and
    # override the two methods below; every other connector's tokens are final as ``forward`` returns them.
    needs_image_size: bool = False

    def num_image_tokens(self, h: int, w: int, canvas: tuple[int, int], original: tuple[int, int]) -> int:
        """Tokens for one image whose ``original`` (height, width) was brought to a ``canvas`` of pixels."""
        return self.num_output_tokens(h, w)

    def arrange(
        self, tokens: torch.Tensor, grid: tuple[int, int], canvas: tuple[int, int], original: tuple[int, int]
    ) -> torch.Tensor:
        """One image's ``forward`` output (Q,D) for an h x w ``grid`` -> the tokens the LLM reads (Q',D)."""
        return tokens


def check_features(features: torch.Tensor, channels: int) -> None:
    if features.ndim != 4 or features.shape[1] != channels:
        raise ValueError(f"connector expects features (B, {channels}, h, w), got {tuple(features.shape)}")


def budget_grid(num_queries: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (qh, qw) output grid of a pooling compressor: the configured one, or the most nearly square factoring of
    the budget (64 -> 8x8, 128 -> 8x16)."""
    if grid is not None:
        qh, qw = grid
        if qh * qw != num_queries:
            raise ValueError(f"connector grid {qh}x{qw} = {qh * qw} tokens does not match the budget {num_queries}")
        return qh, qw
    if num_queries < 1:
        raise ValueError(f"token budget must be at least 1, got {num_queries}")
    qh = max(d for d in range(1, math.isqrt(num_queries) + 1) if num_queries % d == 0)
    return qh, num_queries // qh


def sincos_2d(h: int, w: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code for an h x w grid: (h*w, dim), raster order. Works for any grid."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    y = ys.reshape(-1, 1) * omega  # (h*w, dim/4)
    x = xs.reshape(-1, 1) * omega
    code = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)  # (h*w, 4*(dim//4))
    if code.shape[1] < dim:
        code = torch.nn.functional.pad(code, (0, dim - code.shape[1]))
    return code.to(dtype or torch.float32)


ConnectorBuilder = Callable[[ConnectorConfig, int, int], Connector]
_CONNECTORS: Registry[ConnectorBuilder] = Registry("connector")


def register_connector(name: str) -> Callable[[ConnectorBuilder], ConnectorBuilder]:
    return _CONNECTORS.register(name)


def available_connectors() -> list[str]:
    return _CONNECTORS.names()


def build_connector(cfg: ConnectorConfig, *, in_channels: int, out_dim: int) -> Connector:
    return _CONNECTORS.get(cfg.name)(cfg, in_channels, out_dim)
