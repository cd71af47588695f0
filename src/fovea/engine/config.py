"""The engine's sizes: slots, context, the step's token budget, queue and cache bounds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_batch: int = 16  # requests decoding at once (KV cache slots)
    max_len: int = 2048  # positions per request (prompt + answer); the context limit requests are checked against
    step_tokens: int = 1024  # token budget of one step's packed stream (decode tokens + prefill chunks)
    max_waiting: int = 64  # requests queued beyond the running ones; more raise QueueFull
    encoder_cache: int = 32  # images whose encoder features are kept, keyed by content hash (LRU)
    prefix_cache: int = 8192  # prompt positions whose keys/values are kept for prompts that begin the same way (0: off)

    def validate(self) -> None:
        """A ValueError naming the field, its value and the bound, for any size out of range."""
        for name, least in (("max_batch", 1), ("max_len", 1), ("step_tokens", 1), ("max_waiting", 0),
                            ("encoder_cache", 0), ("prefix_cache", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"EngineConfig.{name} must be an integer >= {least}, got {value!r}")
