"""The OpenAI-compatible HTTP server (FastAPI); import needs the `serve` extra."""

from fovea.serve.app import create_app
from fovea.serve.limits import ServerLimits

__all__ = ["ServerLimits", "create_app"]
