"""One ``SamplingParams`` shared by the Python API, the CLI and the HTTP server, and the sampler.

Notation: N sequences sampled in a step, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

MAX_STOP_STRINGS = 8


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most (>= 1)
    temperature: float = 0.0  # 0 = greedy; otherwise logits are divided by it (0 < t <= 5)
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    seed: int | None = None  # per-request random seed; None = nondeterministic

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise ValueError(f"temperature must be between 0 and 5, got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {self.stop!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """One token per row of ``logits`` (N,V) under each row's params: (N,) long."""
    out = torch.empty(logits.shape[0], dtype=torch.long)
    greedy = logits.argmax(dim=-1).cpu()
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            out[i] = greedy[i]
            continue
        row = logits[i].float() / p.temperature  # (V,)
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.shape[0])).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            row = row.scatter(0, order[drop], float("-inf"))
        out[i] = torch.multinomial(row.softmax(-1).cpu(), 1, generator=generators[i])[0]
    return out
