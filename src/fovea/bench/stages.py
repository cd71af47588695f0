"""Time to first token, split by stage: preprocess -> encode -> compress -> prefill (first token chosen).

Notation: L prompt tokens, N visual tokens, D LLM width.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fovea.bench.common import sync
from fovea.model import VLM


@dataclass
class StageTimes:
    preprocess_ms: float  # image decode + resize + chat template + placeholder expansion
    encode_ms: float  # vision encoder
    compress_ms: float  # connector
    prefill_ms: float  # merge + LLM forward over the prompt + choosing the first token
    visual_tokens: int  # visual tokens the LLM read
    prompt_tokens: int  # all prompt tokens the LLM read (visual included)

    @property
    def ttft_ms(self) -> float:
        return self.preprocess_ms + self.encode_ms + self.compress_ms + self.prefill_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ttft_ms": self.ttft_ms}


def _now() -> float:
    sync()
    return time.perf_counter()


@torch.inference_mode()
def first_token(
    model: VLM, messages: Sequence[dict], images: Sequence[Any], *, features: list[torch.Tensor] | None = None
) -> tuple[StageTimes, int, list[torch.Tensor]]:
    """Run one request to its first token, timing each stage. ``features`` from an earlier call with the same
    encoder and image skip the encoder (its time is then reported as 0). Returns times, token id and features."""
    t0 = _now()
    prompt = model.processor()(messages, images)
    t1 = _now()
    if features is None:
        features = model.encode([img.pixels for img in prompt.images])  # [(C,h,w)]
    t2 = _now()
    visual = model.image_tokens([img.pixels for img in prompt.images], prompt.instructions,
                                [img.original_size for img in prompt.images], features=features)
    t3 = _now()
    embeds = model.embed(prompt.input_ids[None].to(model.device), torch.cat(visual))  # (1,L,D)
    out = model.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    token = int(out.logits[0, -1].argmax())
    t4 = _now()
    times = StageTimes(
        preprocess_ms=1e3 * (t1 - t0), encode_ms=1e3 * (t2 - t1), compress_ms=1e3 * (t3 - t2),
        prefill_ms=1e3 * (t4 - t3), visual_tokens=sum(prompt.num_visual_tokens), prompt_tokens=len(prompt.input_ids),
    )
    return times, token, features
