"""Vision encoders: one contract (``features(pixels) -> (B,C,h,w)``, ``num_tokens(H,W)``), one registry."""

from fovea.vision import timm_encoders as _timm_encoders  # noqa: F401  (registers the timm encoders)
from fovea.vision.base import (
    Encoder,
    available_encoders,
    build_encoder,
    bundled_reader_dir,
    register_encoder,
    resolve_weights,
)

__all__ = [
    "Encoder", "available_encoders", "build_encoder", "bundled_reader_dir", "register_encoder", "resolve_weights",
]
