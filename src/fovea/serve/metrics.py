"""Prometheus metrics for the server (``prometheus_client``, one registry per app): queue depth, cache sizes, token
counters, a TTFT histogram and decode speed."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineGauges:
    """Read at scrape time from the engine: what is queued, running and cached right now."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        for name, doc, value in (
            ("fovea_queue_depth", "Requests waiting for a slot.", e.queue_depth()),
            ("fovea_running_requests", "Requests holding a KV cache slot.", len(e.running)),
            ("fovea_encoder_cache_images", "Images whose visual tokens the encoder cache holds.",
             len(e.encoder_cache)),
            ("fovea_prefix_cache_positions", "Prompt positions whose keys/values the prefix cache holds.",
             e.prefix_cache.held if e.prefix_cache is not None else 0),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.registry.register(_EngineGauges(engine))
        self.requests = Counter("fovea_requests", "Finished requests.", registry=r)
        self.rejected = Counter("fovea_rejected", "Requests refused because the queue was full.", registry=r)
        self.prompt_tokens = Counter("fovea_prompt_tokens", "Prompt tokens read.", registry=r)
        self.visual_tokens = Counter("fovea_visual_tokens", "Visual tokens read.", registry=r)
        self.cached_tokens = Counter("fovea_cached_prompt_tokens",
                                     "Prompt tokens copied from the prefix cache, not prefilled.", registry=r)
        self.completion_tokens = Counter("fovea_completion_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("fovea_ttft_seconds", "Time to first token.", buckets=TTFT_BUCKETS_S, registry=r)
        self.decode = Histogram("fovea_decode_tokens_per_second", "Decode speed per finished request.",
                                buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)

    def observe(self, m: Any) -> None:
        if m is None:
            return
        self.requests.inc()
        self.prompt_tokens.inc(m.prompt_tokens)
        self.visual_tokens.inc(m.visual_tokens)
        self.cached_tokens.inc(m.cached_tokens)
        self.completion_tokens.inc(m.completion_tokens)
        self.ttft.observe(m.ttft_ms / 1e3)
        self.decode.observe(m.decode_tokens_per_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
