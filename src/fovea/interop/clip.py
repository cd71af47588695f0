"""transformers CLIP vision tower (LLaVA's) <-> fovea's timm CLIP ViT (``vit-l14-336`` and its AnyRes form).

The two are the same network: pre-norm blocks with QuickGELU, a class token and learned positions, a LayerNorm
before the first block. transformers keeps q, k and v apart where timm fuses them into one ``qkv`` projection.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from fovea.config import LLAVA_NEXT_PINPOINTS, VisionConfig

_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_BLOCK_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def feature_block(layer: Any, depth: int) -> int:
    """transformers' ``vision_feature_layer`` (an index into hidden_states, whose entry 0 is the embeddings) ->
    the timm block whose output it is."""
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r} is not supported: fovea reads one layer (an int)")
    block = layer - 1 if layer > 0 else depth + layer
    if layer == 0 or not 0 <= block < depth:
        raise ValueError(f"vision_feature_layer {layer} does not name a block of a {depth}-layer tower")
    return block


def vision_config(clip: dict[str, Any], *, feature_layer: Any, anyres: bool,
                  pinpoints: Any = None) -> VisionConfig:
    """fovea's VisionConfig for a transformers CLIPVisionConfig dict."""
    act = clip.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"CLIP tower activation {act!r} is not supported (quick_gelu or gelu)")
    eps = float(clip.get("layer_norm_eps", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"CLIP tower layer_norm_eps {eps} is not supported (fovea's ViT uses 1e-5)")
    hidden, depth = int(clip.get("hidden_size", 1024)), int(clip.get("num_hidden_layers", 24))
    size, patch = int(clip.get("image_size", 336)), int(clip.get("patch_size", 14))
    overrides: dict[str, Any] = {
        "embed_dim": hidden, "depth": depth, "num_heads": int(clip.get("num_attention_heads", 16)),
        "mlp_ratio": int(clip.get("intermediate_size", 4096)) / hidden, "patch_size": patch,
    }
    if act == "gelu":
        overrides["act_layer"] = "gelu"
    block = feature_block(feature_layer, depth)
    cfg = VisionConfig(name="vit-l14-336-anyres" if anyres else "vit-l14-336", overrides=overrides,
                       tile_size=size, feature_layer=block - depth)
    if anyres:
        cfg.pinpoints = tuple(tuple(int(v) for v in p) for p in (pinpoints or LLAVA_NEXT_PINPOINTS))
    return cfg


def to_timm(state: dict[str, torch.Tensor], *, depth: int, keep_blocks: int) -> dict[str, torch.Tensor]:
    """A CLIP vision tower's weights (keys from ``embeddings.``/``pre_layrnorm.``/``encoder.``) -> timm ViT keys.
    Blocks from ``keep_blocks`` on and the post-LayerNorm are never used by a VLM and are dropped; anything
    else unknown is an error."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)  # (D,) -> (1,1,D)
        elif key == "embeddings.patch_embedding.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]  # (1+N,D) -> (1,1+N,D)
        elif key.startswith("pre_layrnorm."):
            out["norm_pre." + key.split(".", 1)[1]] = value
        elif key.startswith("post_layernorm.") or key == "embeddings.position_ids":
            continue
        elif (m := _BLOCK.fullmatch(key)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            if i >= depth:
                unknown.append(key)
            elif i >= keep_blocks:
                continue
            elif rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(i, {})[rest.split(".", 1)[1]] = value
            else:
                name, leaf = rest.rsplit(".", 1)
                if name not in _BLOCK_NAMES:
                    unknown.append(key)
                else:
                    out[f"blocks.{i}.{_BLOCK_NAMES[name]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"vision tower keys fovea does not know: {sorted(unknown)[:8]}")
    for i, parts in qkv.items():
        for leaf in ("weight", "bias"):
            names = [f"{p}_proj.{leaf}" for p in "qkv"]
            missing = [n for n in names if n not in parts]
            if missing:
                raise ValueError(f"vision tower layer {i} is missing {missing}")
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[n] for n in names])  # 3 x (D,...) -> (3D,...)
    return out
