"""Varlen attention backends (segments, dense, flex, flash_varlen) under one signature, registered with
transformers' AttentionInterface as ``fovea_<name>``."""

from fovea.attention.backends import BACKENDS, Backend, block_causal_mask, register_backend, resolve_backend
from fovea.attention.hf import PREFIX, use_backend

__all__ = ["BACKENDS", "PREFIX", "Backend", "block_causal_mask", "register_backend", "resolve_backend",
           "use_backend"]
