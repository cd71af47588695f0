"""Prometheus text exposition for the server: queue depth, TTFT histogram, tokens per second."""

from __future__ import annotations

import threading
from typing import Any

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0  # finished requests
        self.rejected = 0  # refused with 429 (queue full)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.visual_tokens = 0
        self.cached_tokens = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS_S)
        self.ttft_sum = 0.0
        self.decode_tps_sum = 0.0

    def observe(self, m: Any) -> None:
        if m is None:
            return
        with self.lock:
            self.requests += 1
            self.prompt_tokens += m.prompt_tokens
            self.completion_tokens += m.completion_tokens
            self.visual_tokens += m.visual_tokens
            self.cached_tokens += m.cached_tokens
            ttft = m.ttft_ms / 1e3
            self.ttft_sum += ttft
            for i, bound in enumerate(TTFT_BUCKETS_S):
                if ttft <= bound:
                    self.ttft_counts[i] += 1
            self.decode_tps_sum += m.decode_tokens_per_s

    def render(self, engine: Any) -> str:
        with self.lock:
            lines = [
                "# HELP fovea_queue_depth Requests waiting for a slot.", "# TYPE fovea_queue_depth gauge",
                f"fovea_queue_depth {engine.queue_depth()}",
                "# HELP fovea_running_requests Requests holding a KV cache slot.",
                "# TYPE fovea_running_requests gauge", f"fovea_running_requests {len(engine.running)}",
                "# HELP fovea_encoder_cache_images Images whose visual tokens the encoder cache holds.",
                "# TYPE fovea_encoder_cache_images gauge", f"fovea_encoder_cache_images {len(engine.encoder_cache)}",
                "# HELP fovea_prefix_cache_positions Prompt positions whose keys/values the prefix cache holds.",
                "# TYPE fovea_prefix_cache_positions gauge",
                f"fovea_prefix_cache_positions {engine.prefix_cache.held if engine.prefix_cache is not None else 0}",
                "# HELP fovea_requests_total Finished requests.", "# TYPE fovea_requests_total counter",
                f"fovea_requests_total {self.requests}",
                "# HELP fovea_rejected_total Requests refused because the queue was full.",
                "# TYPE fovea_rejected_total counter", f"fovea_rejected_total {self.rejected}",
                "# HELP fovea_prompt_tokens_total Prompt tokens read.", "# TYPE fovea_prompt_tokens_total counter",
                f"fovea_prompt_tokens_total {self.prompt_tokens}",
                "# HELP fovea_visual_tokens_total Visual tokens read.", "# TYPE fovea_visual_tokens_total counter",
                f"fovea_visual_tokens_total {self.visual_tokens}",
                "# HELP fovea_cached_prompt_tokens_total Prompt tokens copied from the prefix cache, not prefilled.",
                "# TYPE fovea_cached_prompt_tokens_total counter",
                f"fovea_cached_prompt_tokens_total {self.cached_tokens}",
                "# HELP fovea_completion_tokens_total Tokens generated.",
                "# TYPE fovea_completion_tokens_total counter",
                f"fovea_completion_tokens_total {self.completion_tokens}",
                "# HELP fovea_ttft_seconds Time to first token.", "# TYPE fovea_ttft_seconds histogram",
            ]
            for bound, count in zip(TTFT_BUCKETS_S, self.ttft_counts, strict=True):
                lines.append(f'fovea_ttft_seconds_bucket{{le="{bound}"}} {count}')
            lines += [f'fovea_ttft_seconds_bucket{{le="+Inf"}} {self.requests}',
                      f"fovea_ttft_seconds_sum {self.ttft_sum:.6f}", f"fovea_ttft_seconds_count {self.requests}",
                      "# HELP fovea_decode_tokens_per_second Mean decode speed per finished request.",
                      "# TYPE fovea_decode_tokens_per_second gauge",
                      f"fovea_decode_tokens_per_second {self.decode_tps_sum / max(self.requests, 1):.3f}"]
        return "\n".join(lines) + "\n"
