"""transformers' FastVLM (``FastVlmForConditionalGeneration``) <-> fovea's FastViTHD + MLP + LLM.

The two hold the same modules under different names: the timm FastViT (fused, ``inference_mode``) as the vision
tower, a two-layer GELU projector, and a causal LM.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fovea.config import ConnectorConfig, LMConfig, VisionConfig, VLMConfig
from fovea.interop import register_converter
from fovea.interop.common import (
    Converted,
    load_tokenizer,
    preprocess_config,
    read_image_processor,
    read_license,
    read_state,
)

if TYPE_CHECKING:
    from fovea.model import VLM

# (fovea prefix, transformers FastVLM prefix)
KEY_MAP = [
    ("encoder.model.", "model.vision_tower.timm_model."),
    ("connector.fc1.", "model.multi_modal_projector.linear_1."),
    ("connector.fc2.", "model.multi_modal_projector.linear_2."),
    ("lm.model.", "model.language_model."),
    ("lm.lm_head.", "lm_head."),
]


def _convert(state: dict[str, torch.Tensor], src: int, dst: int, names: tuple[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        pair = next((p for p in KEY_MAP if key.startswith(p[src])), None)
        if pair is None:
            raise ValueError(f"{names[0]} checkpoint key {key!r} has no {names[1]} counterpart (unexpected key)")
        out[pair[dst] + key[len(pair[src]):]] = value
    return out


def to_fastvlm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(state, 0, 1, ("fovea", "FastVLM"))


def from_fastvlm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(state, 1, 0, ("FastVLM", "fovea"))


def fastvlm_peer(model: VLM, *, image_token_id: int | None = None):
    """A transformers ``FastVlmForConditionalGeneration`` with ``model``'s shapes and weights (the encoder must
    be FastViTHD, fused with ``VLM.reparameterize_encoder``; the connector the MLP)."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration

    if model.config.vision.name != "fastvithd" or model.config.connector.name != "mlp":
        raise ValueError(f"a FastVLM peer needs fastvithd + mlp, got {model.config.vision.name} + "
                         f"{model.config.connector.name}")
    overrides = dict(model.config.vision.overrides)
    if not overrides.get("inference_mode"):
        raise ValueError("fuse the encoder first (VLM.reparameterize_encoder): FastVLM stores FastViTHD fused")
    config = FastVlmConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "do_pooling": False,
                       "hidden_size": model.encoder.channels, "model_args": overrides},
        text_config=model.lm.config.to_dict(),
        image_token_index=image_token_id if image_token_id is not None else model.image_token_id,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(model.lm.config.tie_word_embeddings),
    )
    peer = FastVlmForConditionalGeneration(config)
    state = to_fastvlm_state(model.state_dict())
    missing, unexpected = peer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"FastVLM peer does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    peer.config.text_config._attn_implementation = "sdpa"
    return peer.eval()


@register_converter("fast_vlm")
def convert_fastvlm(path: Path, config: dict) -> Converted:
    """A directory written by ``FastVlmForConditionalGeneration.save_pretrained`` -> fovea's FastViTHD + MLP."""
    vision, text = dict(config.get("vision_config") or {}), dict(config.get("text_config") or {})
    arch = vision.get("architecture", "fastvit_mci3")
    if arch != "fastvit_mci3":
        raise ValueError(f"FastVLM vision tower {arch!r} is not supported (fastvit_mci3, FastViTHD)")
    if config.get("projector_hidden_act", "gelu") != "gelu" or not config.get("multimodal_projector_bias", True):
        raise ValueError("FastVLM projector must be gelu with biases")
    overrides = dict(vision.get("model_args") or {})
    image_token_id = int(config.get("image_token_index", config.get("image_token_id", 151646)))
    tokenizer, image_token = load_tokenizer(path, image_token_id)
    # FastVLM feeds [0, 1] pixels (no normalisation) at 1024 px, padded to a square as it was trained, unless the
    # saved processor crops (then fovea crops as it does).
    settings = read_image_processor(path)
    pre = preprocess_config(settings, side=1024, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), square=True,
                            pad_position="center", center_crop=bool(settings.get("do_center_crop", False)))
    fovea_config = VLMConfig(
        vision=VisionConfig(name="fastvithd", overrides=overrides), connector=ConnectorConfig(name="mlp"),
        lm=LMConfig(name="local", path=str(path)), preprocess=pre, image_token=image_token,
        license=read_license(path),
    )
    return Converted(fovea_config, text, tokenizer, from_fastvlm_state(read_state(path)), source=str(path))
