"""transformers LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)
-> fovea: CLIP tower -> ``vit-l14-336`` / ``vit-l14-336-anyres``, projector -> ``mlp`` / ``llava_next``, LLM as is.

Both the current layout (``model.vision_tower.``, ``model.language_model.``, ``lm_head.``) and the older one
that most published checkpoints use (``vision_tower.vision_model.``, ``language_model.model.``) are read.
"""

from __future__ import annotations

from pathlib import Path

from fovea.config import CLIP_MEAN, CLIP_STD, ConnectorConfig, LMConfig, VLMConfig
from fovea.interop import clip, register_converter
from fovea.interop.common import (
    Converted,
    load_tokenizer,
    preprocess_config,
    read_image_processor,
    read_license,
    read_state,
    rename,
    take,
)

# Older checkpoint layout -> current transformers layout (first match wins).
LEGACY = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
]


def _check_projector(config: dict) -> None:
    act = config.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"projector activation {act!r} is not supported (fovea's MLP uses gelu)")
    if not config.get("multimodal_projector_bias", True):
        raise ValueError("a projector without bias is not supported (fovea's MLP has biases)")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported: fovea drops the class "
                         "token ('default')")


@register_converter("llava", "llava_next")
def convert_llava(path: Path, config: dict) -> Converted:
    anyres = config["model_type"] == "llava_next"
    _check_projector(config)
    vision, text = dict(config.get("vision_config") or {}), dict(config.get("text_config") or {})
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision tower {vision.get('model_type')!r} is not supported (CLIP only)")
    if not text.get("model_type"):
        raise ValueError(f"{str(path)!r}: text_config has no model_type")
    vcfg = clip.vision_config(vision, feature_layer=config.get("vision_feature_layer", -2), anyres=anyres,
                              pinpoints=config.get("image_grid_pinpoints"))
    depth = vcfg.overrides["depth"]
    image_token_id = int(config.get("image_token_index", config.get("image_token_id", 32000)))
    tokenizer, image_token = load_tokenizer(path, image_token_id)
    settings = read_image_processor(path)
    # LLaVA-1.5 follows the checkpoint's processor: transformers' CLIP processor (resize + centre crop) unless the
    # saved settings turn cropping off, in which case the page is padded to a square as LLaVA-1.5 trained ("pad").
    pre = preprocess_config(
        settings, side=vcfg.tile_size, mean=CLIP_MEAN, std=CLIP_STD, square=not anyres,
        pad_position="center", pad_value=0.0 if anyres else None,
        center_crop=not anyres and bool(settings.get("do_center_crop", True)),
    )
    fovea_config = VLMConfig(
        vision=vcfg, connector=ConnectorConfig(name="llava_next" if anyres else "mlp"),
        lm=LMConfig(name="local", path=str(path)), preprocess=pre, image_token=image_token,
        license=read_license(path),
    )

    state = rename(read_state(path), LEGACY)
    tower = take(state, "model.vision_tower.")
    tower = {k.removeprefix("vision_model."): v for k, v in tower.items()}
    out = {f"encoder.model.{k}": v for k, v in
           clip.to_timm(tower, depth=depth, keep_blocks=(vcfg.feature_layer % depth) + 1).items()}
    out.update({f"connector.fc1.{k}": v for k, v in take(state, "model.multi_modal_projector.linear_1.").items()})
    out.update({f"connector.fc2.{k}": v for k, v in take(state, "model.multi_modal_projector.linear_2.").items()})
    if anyres and "model.image_newline" in state:
        out["connector.image_newline"] = state.pop("model.image_newline")
    out.update({f"lm.model.{k}": v for k, v in take(state, "model.language_model.").items()})
    out.update({f"lm.lm_head.{k}": v for k, v in take(state, "lm_head.").items()})
    out.update(state)  # anything left is unexpected, and assemble names it
    return Converted(fovea_config, text, tokenizer, out, source=str(path))
