"""Query-based compressors: the Flamingo Perceiver Resampler and the BLIP-2 / InstructBLIP Q-Former.

Notation: B images, C channels, h x w grid, N = h*w image tokens, Q queries (the budget), L instruction tokens,
E connector width, D LLM width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fovea.config import ConnectorConfig
from fovea.connectors.base import Connector, check_features, register_connector, sincos_2d


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, e = x.shape
    return x.view(b, n, heads, e // heads).transpose(1, 2)  # (B,n,E) -> (B,H,n,E/H)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B,H,n,E/H) -> (B,n,E)


def _image_tokens(features: torch.Tensor, position_encoding: bool) -> torch.Tensor:
    b, c, h, w = features.shape
    tokens = features.flatten(2).transpose(1, 2)  # (B,C,h,w) -> (B,N,C)
    if position_encoding:
        tokens = tokens + sincos_2d(h, w, c, device=tokens.device, dtype=tokens.dtype)
    return tokens


def _mean_map(connector: Connector, modules: list[nn.Module], features: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run ``connector`` once, catch each cross-attending module's inputs, and average their ``weights`` over
    heads, queries and modules: (B,h,w), each map summing to 1."""
    caught: list[tuple] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: caught.append((m, args[:2]))) for m in modules]
    try:
        connector(features, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    b, _, h, w = features.shape
    maps = torch.stack([m.weights(*args).mean(dim=(1, 2)) for m, args in caught])  # (layers,B,N)
    return maps.mean(0).view(b, h, w)  # (B,N) -> (B,h,w)


class PerceiverLayer(nn.Module):
    """Latents attend to [image tokens; latents] (Flamingo), then a feed-forward block; both pre-norm residual."""

    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )
        self.dropout = dropout

    def weights(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The latents' attention probabilities over the image tokens (renormalised without the latents' own
        keys): (B,H,Q,N)."""
        x, lat = self.norm_media(media), self.norm_latents(latents)
        k, _ = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)  # (B,N+Q,E)
        q = _heads(self.to_q(lat), self.heads)  # (B,H,Q,d)
        probs = torch.softmax(q @ _heads(k, self.heads).transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        image = probs[..., : media.shape[1]]  # (B,H,Q,N+Q) -> (B,H,Q,N)
        return image / image.sum(-1, keepdim=True)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, lat = self.norm_media(media), self.norm_latents(latents)  # (B,N,E), (B,Q,E)
        q = _heads(self.to_q(lat), self.heads)  # (B,H,Q,E/H)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)  # (B,N+Q,E) each
        attn = F.scaled_dot_product_attention(
            q, _heads(k, self.heads), _heads(v, self.heads), dropout_p=self.dropout if self.training else 0.0
        )
        latents = latents + self.to_out(_merge(attn))  # (B,Q,E)
        return latents + self.ff(latents)


class PerceiverResampler(Connector):
    """Q learned latents read the image through ``num_layers`` cross-attention layers; output (B,Q,D)."""

    has_queries = True

    def __init__(
        self, *, in_channels: int, out_dim: int, num_queries: int, dim: int, num_layers: int, heads: int,
        dropout: float = 0.0, position_encoding: bool = True,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"perceiver width {dim} is not divisible by its {heads} heads")
        self.in_channels, self.num_queries, self.position_encoding = in_channels, num_queries, position_encoding
        self.proj_in = nn.Linear(in_channels, dim)
        self.latents = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(dim=dim, heads=heads, dropout=dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)

    def forward(self, features, text_embeds=None, text_mask=None):
        check_features(features, self.in_channels)
        media = self.proj_in(_image_tokens(features, self.position_encoding))  # (B,N,C) -> (B,N,E)
        latents = self.latents.expand(features.shape[0], -1, -1)  # (Q,E) -> (B,Q,E)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.proj_out(self.norm(latents))  # (B,Q,E) -> (B,Q,D)

    def attention_map(self, features, text_embeds=None, text_mask=None, **kwargs):
        return _mean_map(self, list(self.layers), features, {})

    @property
    def budget(self) -> int:
        return self.num_queries

    def num_output_tokens(self, h: int, w: int) -> int:
        return self.num_queries


class QFormerAttention(nn.Module):
    """BERT attention with its post-norm output block; names follow transformers' Blip2QFormer for weight loading."""

    def __init__(self, *, dim: int, kv_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The attention probabilities of ``x`` over ``context`` (no mask): (B,H,n,m)."""
        q, k = _heads(self.query(x), self.heads), _heads(self.key(context), self.heads)  # (B,H,n,d), (B,H,m,d)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = _heads(self.query(x), self.heads)  # (B,n,E) -> (B,H,n,E/H)
        k = _heads(self.key(context), self.heads)  # (B',m,E') -> (B',H,m,E/H)
        v = _heads(self.value(context), self.heads)
        drop = self.dropout if self.training else 0.0
        if k.shape[0] == 1 and q.shape[0] > 1 and mask is None:
            # One image read by B instructions' queries: each query row attends on its own, so the B*n queries go
            # through one attention over the image's keys and values, made once.
            bq, h, n, d = q.shape
            flat = q.transpose(0, 1).reshape(1, h, bq * n, d)  # (B,H,n,d) -> (1,H,B*n,d)
            attn = F.scaled_dot_product_attention(flat, k, v, dropout_p=drop)
            attn = attn.reshape(h, bq, n, d).transpose(0, 1)  # (1,H,B*n,d) -> (B,H,n,d)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.norm(x + self.dense(_merge(attn)))  # (B,n,E)


class QFormerFFN(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.output(F.gelu(self.intermediate(x))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; instruction], cross-attention (queries only) to the image when ``cross``,
    then separate feed-forward blocks for queries and instruction tokens (BLIP-2)."""

    def __init__(
        self, *, dim: int, image_dim: int, heads: int, cross: bool, text: bool, hidden: int, dropout: float
    ) -> None:
        super().__init__()
        self.attention = QFormerAttention(dim=dim, kv_dim=dim, heads=heads, dropout=dropout)
        self.crossattention = (
            QFormerAttention(dim=dim, kv_dim=image_dim, heads=heads, dropout=dropout) if cross else None
        )
        self.ffn_query = QFormerFFN(dim=dim, hidden=hidden)
        self.ffn_text = QFormerFFN(dim=dim, hidden=hidden) if text else None  # BLIP-2 has none: queries only

    def forward(self, x: torch.Tensor, image: torch.Tensor, num_queries: int, mask: torch.Tensor | None):
        x = self.attention(x, x, mask)  # (B,Q+L,E)
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B,Q,E), (B,L,E)
        if self.crossattention is not None:
            queries = self.crossattention(queries, image)  # (B,Q,E) attends to (B,N,C)
        if self.ffn_text is None or text.shape[1] == 0:
            return self.ffn_query(queries)
        return torch.cat([self.ffn_query(queries), self.ffn_text(text)], dim=1)


class QFormer(Connector):
    """BLIP-2 Q-Former: Q learned queries, self-attention every layer, cross-attention to the image every
    ``cross_attention_every`` layers; with ``instruction_aware`` the instruction joins the self-attention
    (InstructBLIP), either as LLM embeddings through ``text_proj`` or, with ``text_vocab_size``, as ids in the
    Q-Former's own vocabulary (InstructBLIP's BERT embeddings). The query outputs are projected to the LLM width:
    (B,Q,D). Parameter names follow transformers' BLIP-2 so ``fovea.interop.blip2`` loads its weights."""

    has_queries = True

    def __init__(
        self, *, in_channels: int, out_dim: int, num_queries: int, dim: int, num_layers: int, heads: int,
        cross_attention_every: int = 2, instruction_aware: bool = False, text_dim: int | None = None,
        dropout: float = 0.0, position_encoding: bool = True, image_norm: bool = True, intermediate_size: int = 0,
        text_vocab_size: int = 0, max_text_positions: int = 512, image_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Q-Former width {dim} is not divisible by its {heads} heads")
        if cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be >= 1, got {cross_attention_every}")
        if text_vocab_size and not instruction_aware:
            raise ValueError("a Q-Former vocabulary (text_vocab_size) only serves instruction_aware Q-Formers")
        self.in_channels, self.num_queries, self.position_encoding = in_channels, num_queries, position_encoding
        self.instruction_aware, self.max_text_positions = instruction_aware, max_text_positions
        self.image_norm = nn.LayerNorm(in_channels, eps=image_norm_eps) if image_norm else nn.Identity()
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        own_vocab = instruction_aware and text_vocab_size > 0
        self.text_proj = nn.Linear(text_dim or out_dim, dim) if instruction_aware and not own_vocab else None
        self.word_embeddings = nn.Embedding(text_vocab_size, dim) if own_vocab else None
        self.position_embeddings = nn.Embedding(max_text_positions, dim) if own_vocab else None
        self.layernorm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(
            QFormerLayer(dim=dim, image_dim=in_channels, heads=heads, cross=i % cross_attention_every == 0,
                         text=instruction_aware, hidden=intermediate_size or 4 * dim, dropout=dropout)
            for i in range(num_layers)
        )
        self.proj_out = nn.Linear(dim, out_dim)

    @property
    def has_own_vocabulary(self) -> bool:
        return self.word_embeddings is not None

    def forward(self, features, text_embeds=None, text_mask=None, text_ids=None):
        """``text_embeds`` (B,L,D) LLM embeddings of the instruction, or ``text_ids`` (B,L) in the Q-Former's own
        vocabulary; ``text_mask`` (B,L) marks real tokens. ``features`` of one image (1,C,h,w) with B > 1
        instructions reads that image once for all of them (several questions about one page)."""
        return self.proj_out(self.query_states(features, text_embeds, text_mask, text_ids))  # (B,Q,D)

    def attention_map(self, features, text_embeds=None, text_mask=None, text_ids=None, **kwargs):
        crosses = [layer.crossattention for layer in self.layers if layer.crossattention is not None]
        return _mean_map(self, crosses, features, {"text_embeds": text_embeds, "text_mask": text_mask,
                                                   "text_ids": text_ids})

    def query_states(self, features, text_embeds=None, text_mask=None, text_ids=None) -> torch.Tensor:
        """The queries' last hidden states before the LLM projection, (B,Q,E): BLIP-2's ``query_output``."""
        check_features(features, self.in_channels)
        b = features.shape[0]
        given = text_embeds if text_embeds is not None else text_ids
        if b == 1 and self.instruction_aware and given is not None and given.ndim >= 2:
            b = given.shape[0]  # one image, b instructions: the image tokens stay (1,N,C)
        image = self.image_norm(_image_tokens(features, self.position_encoding))  # (B,N,C)
        x = self.query_tokens.expand(b, -1, -1)  # (B,Q,E)
        text = self._text(b, text_embeds, text_ids)  # (B,L,E) or None
        mask = None
        if text is not None:
            x = torch.cat([x, text], dim=1)  # (B,Q+L,E)
            if text_mask is not None:
                keep = torch.cat([torch.ones(b, self.num_queries, dtype=torch.bool, device=x.device),
                                  text_mask.to(device=x.device, dtype=torch.bool)], dim=1)  # (B,Q+L)
                mask = keep[:, None, None, :]  # (B,1,1,Q+L): padded instruction tokens are never attended to
        x = self.layernorm(x)
        for layer in self.layers:
            x = layer(x, image, self.num_queries, mask)
        return x[:, : self.num_queries]  # (B,Q+L,E) -> (B,Q,E)

    def _text(self, b: int, text_embeds: torch.Tensor | None, text_ids: torch.Tensor | None) -> torch.Tensor | None:
        if not self.instruction_aware:
            return None
        if self.has_own_vocabulary:
            if text_ids is None:
                if text_embeds is not None:
                    raise ValueError("this Q-Former reads instructions as ids in its own vocabulary: pass text_ids "
                                     "(from its own tokenizer), not LLM embeddings")
                return None
            if text_ids.ndim != 2 or text_ids.shape[0] != b:
                raise ValueError(f"instruction ids must be (B={b}, L), got {tuple(text_ids.shape)}")
            length = text_ids.shape[1]
            if length > self.max_text_positions:
                raise ValueError(f"instruction has {length} tokens, over the Q-Former's {self.max_text_positions}")
            vocab = self.word_embeddings.num_embeddings
            if text_ids.numel() and (int(text_ids.max()) >= vocab or int(text_ids.min()) < 0):
                raise ValueError(f"instruction ids must lie in [0, {vocab})")
            positions = torch.arange(length, device=text_ids.device)
            return self.word_embeddings(text_ids) + self.position_embeddings(positions)  # (B,L,E)
        if text_embeds is None:
            return None
        if text_embeds.ndim != 3 or text_embeds.shape[0] != b:
            raise ValueError(f"instruction embeddings must be (B={b}, L, D), got {tuple(text_embeds.shape)}")
        return self.text_proj(text_embeds)  # (B,L,D) -> (B,L,E)

    @property
    def budget(self) -> int:
        return self.num_queries

    def num_output_tokens(self, h: int, w: int) -> int:
        return self.num_queries


def _width(cfg: ConnectorConfig, out_dim: int) -> int:
    width = cfg.hidden_size or out_dim
    return width - width % cfg.num_heads or cfg.num_heads


@register_connector("perceiver")
def perceiver(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return PerceiverResampler(
        in_channels=in_channels, out_dim=out_dim, num_queries=cfg.num_queries, dim=_width(cfg, out_dim),
        num_layers=cfg.num_layers, heads=cfg.num_heads, dropout=cfg.dropout, position_encoding=cfg.position_encoding,
    )


@register_connector("qformer")
def qformer(cfg: ConnectorConfig, in_channels: int, out_dim: int) -> Connector:
    return QFormer(
        in_channels=in_channels, out_dim=out_dim, num_queries=cfg.num_queries, dim=_width(cfg, out_dim),
        num_layers=cfg.num_layers, heads=cfg.num_heads, cross_attention_every=cfg.cross_attention_every,
        instruction_aware=cfg.instruction_aware, text_dim=out_dim, dropout=cfg.dropout,
        position_encoding=cfg.position_encoding, image_norm=cfg.image_norm, intermediate_size=cfg.intermediate_size,
        text_vocab_size=cfg.text_vocab_size, max_text_positions=cfg.max_text_positions,
    )
