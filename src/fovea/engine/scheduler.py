"""Which requests run in a step and how much of each: slots, the token budget, chunked prefill, and when a prompt
starts from the prefix cache or waits for a request that is prefilling the same prefix."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from fovea.engine.cache import PrefixCache, SlotKVCache, shared_prefix
from fovea.engine.config import EngineConfig
from fovea.engine.request import QueueFull, Request

# A request waits for another's prefill only when it would reuse at least this many more positions than the cache
# holds now: waiting costs it a step of TTFT.
MIN_SHARED_PREFIX = 16


@dataclass
class Chunk:
    """One request's share of a step's packed stream."""

    request: Request
    start: int  # the first position this step computes
    length: int  # positions this step computes
    decode: bool  # one generated token (True) or a piece of the prompt
    samples: bool  # the step samples the request's next token from the chunk's last position


class Scheduler:
    """Waiting and running requests. Not thread-safe: the engine calls it under its lock (``add``, ``admit``) or
    from the stepping thread alone (``plan``)."""

    def __init__(self, config: EngineConfig, kv: SlotKVCache, prefix_cache: PrefixCache | None) -> None:
        self.config, self.kv, self.prefix_cache = config, kv, prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def check_room(self) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting, the limit is {self.config.max_waiting}")

    def add(self, request: Request) -> None:
        self.check_room()
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def aborted(self) -> list[Request]:
        return [r for r in self.running if r.aborted] + [r for r in self.waiting if r.aborted]

    def admit(self) -> list[Request]:
        """Drop finished requests, give waiting ones the free slots (first come, first served); the running."""
        self.waiting = deque(r for r in self.waiting if not r.done)
        self.running = [r for r in self.running if not r.done]
        while self.waiting and self.kv.free:
            r = self.waiting.popleft()
            r.slot = self.kv.allocate()
            self.running.append(r)
        return list(self.running)

    def plan(self, batch: list[Request]) -> list[Chunk]:
        """The step's stream: every decoding request's token first (they never wait behind a long prefill), then
        prefill chunks as far as ``step_tokens`` goes. Advances each request's ``prefilled``."""
        budget = self.config.step_tokens
        chunks = []
        for r in batch:
            if r.prompt_done and r.tokens:
                chunks.append(Chunk(r, len(r.prompt_embeds) + len(r.tokens) - 1, 1, decode=True, samples=True))
                budget -= 1
        for r in batch:
            if r.prompt_done or budget <= 0:
                continue
            if r.prefill_start is None:
                if self.prefix_cache is not None and not self._start_from_cache(r, batch):
                    continue
                r.prefill_start = time.perf_counter()
            n = min(len(r.prompt_embeds) - r.prefilled, budget)
            chunks.append(Chunk(r, r.prefilled, n, decode=False, samples=r.prefilled + n == len(r.prompt_embeds)))
            budget -= n
            r.prefilled += n
        return chunks

    def _start_from_cache(self, r: Request, batch: list[Request]) -> bool:
        """Copy ``r``'s longest cached prompt prefix into its slot and return True; or return False (nothing done)
        when a request whose prefill is under way shares a longer prefix: waiting for it and copying beats
        computing the same positions twice (16 requests about one page arriving together prefill it once)."""
        limit = len(r.prompt_keys) - 1  # the last position is always computed: its logits give the first token
        found = self.prefix_cache.match(r.prompt_keys)
        cached = min(found[1], limit)
        for other in batch:
            if other is not r and other.prefill_start is not None and not other.tokens and not other.done:
                if min(shared_prefix(other.prompt_keys, r.prompt_keys), limit) >= cached + MIN_SHARED_PREFIX:
                    return False
        r.prefilled = r.metrics.cached_tokens = self.prefix_cache.load(r.prompt_keys, self.kv, r.slot, limit, found)
        return True
