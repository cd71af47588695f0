"""The inference engine: encoder cache, packed chunked prefill, continuous-batching decode, streaming."""

from fovea.engine.engine import Engine, EngineConfig, Event, QueueFull, Request, RequestMetrics, collect, stream
from fovea.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "Event", "QueueFull", "Request", "RequestMetrics", "SamplingParams", "collect",
           "stream"]
