"""The OpenAI-compatible HTTP server (FastAPI); import needs the `serve` extra."""

from fovea.serve.app import create_app

__all__ = ["create_app"]
