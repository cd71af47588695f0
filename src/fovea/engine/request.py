"""What the engine keeps per request, and what it streams back."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any

import torch

from fovea.engine.detokenizer import Detokenizer
from fovea.engine.sampling import SamplingParams


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; try again later."""


@dataclass
class RequestMetrics:
    visual_tokens: int = 0  # visual tokens sent to the LLM
    prompt_tokens: int = 0  # all prompt tokens (visual included)
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (not prefilled)
    completion_tokens: int = 0  # tokens generated
    preprocess_ms: float = 0.0  # image decode/resize + chat template
    encode_ms: float = 0.0  # vision encoder (0 when every image came from the encoder cache)
    compress_ms: float = 0.0  # connector
    prefill_ms: float = 0.0  # from first scheduled prefill chunk to the first token
    ttft_ms: float = 0.0  # from submission to the first token
    decode_tokens_per_s: float = 0.0  # completion tokens after the first, per second
    encoder_cache_hits: int = 0  # images served from the encoder cache

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Event:
    request_id: str
    text: str  # new text since the previous event
    token_ids: list[int]  # new token ids
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    metrics: RequestMetrics | None = None  # set on the final event


@dataclass
class Request:
    id: str
    prompt_embeds: torch.Tensor  # (L,D)
    prompt_keys: torch.Tensor  # (L,) what sits at each position (token id or image content), for the prefix cache
    params: SamplingParams
    metrics: RequestMetrics
    submitted: float  # perf_counter at submission
    detokenizer: Detokenizer  # the answer's text, token by token
    events: Any = field(default_factory=queue.Queue)  # where its events go (anything with ``put``)
    generator: torch.Generator | None = None  # its own random stream when seeded
    slot: int | None = None  # KV cache slot while running
    prefilled: int = 0  # prompt positions whose keys/values are in the slot
    tokens: list[int] = field(default_factory=list)  # generated token ids
    emitted: int = 0  # characters of the text already sent
    prefill_start: float | None = None
    first_token_time: float | None = None
    aborted: bool = False
    done: bool = False

    @property
    def text(self) -> str:
        return self.detokenizer.text

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == len(self.prompt_embeds)
