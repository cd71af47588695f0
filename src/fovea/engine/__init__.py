"""The inference engine: encoder cache, packed chunked prefill, continuous-batching decode, streaming."""

from fovea.engine.config import EngineConfig
from fovea.engine.engine import Engine, collect, stream
from fovea.engine.request import Event, QueueFull, Request, RequestMetrics
from fovea.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "Event", "QueueFull", "Request", "RequestMetrics", "SamplingParams", "collect",
           "stream"]
