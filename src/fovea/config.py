"""Dataclass configs, one per stage, and named presets.

Every field carries a comment saying what it controls. Configs are plain data: builders in each
subpackage turn them into modules, and ``VLMConfig.to_dict``/``from_dict`` make them JSON-safe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Default pixel ceiling: a 4096x4096 image. Above that, decoding alone costs hundreds of MB.
DEFAULT_MAX_PIXELS = 4096 * 4096

# LLaVA-NeXT's grid pinpoints for AnyRes tiling with 336 px crops (height, width).
LLAVA_NEXT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass
class PreprocessConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels than this are rejected with a ValueError
    max_side: int = 1024  # long side after resizing (aspect ratio kept); stride padding comes after
    upscale: bool = False  # whether images smaller than max_side are enlarged to it
    pad_value: float = 1.0  # padding colour in [0, 1] before normalisation; white suits documents
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel std divided after subtracting the mean
    square: bool = False  # fit the image inside a max_side square canvas (LLaVA-1.5 "pad"): fixed-size encoders
    center_crop: bool = False  # shorter side to max_side, then the centre square (CLIP / transformers' processors)
    pad_position: str = "end"  # padding goes at the "end" (bottom/right) or "center" (LLaVA-NeXT's unpad expects it)


@dataclass
class VisionConfig:
    name: str = "fastvithd"  # encoder registry key (see fovea.vision.available_encoders())
    weights: str | None = None  # local .safetensors/.pth with the encoder's pretrained weights; None = random init
    overrides: dict[str, Any] = field(default_factory=dict)  # constructor overrides, e.g. tiny sizes in tests
    tile_size: int = 336  # crop side for tiled (AnyRes) encoders
    pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS  # AnyRes candidate resolutions (h, w)
    feature_layer: int = -2  # ViT block whose output is used (LLaVA takes the penultimate one)


@dataclass
class ConnectorConfig:
    name: str = "mlp"  # connector registry key (see fovea.connectors.available_connectors())
    num_queries: int = 256  # token budget Q for compressors; ignored by 1:1 connectors (linear, mlp)
    grid: tuple[int, int] | None = None  # (qh, qw) output grid for avgpool/c_abstractor; None = near-square Q
    hidden_size: int = 0  # inner width of the connector; 0 = the LLM's hidden size
    num_layers: int = 2  # transformer layers (perceiver, qformer) or conv blocks per stage (c_abstractor)
    num_heads: int = 8  # attention heads inside perceiver/qformer
    cross_attention_every: int = 2  # Q-Former: cross-attention to the image on every n-th layer (BLIP-2: 2)
    instruction_aware: bool = False  # Q-Former: instruction tokens join the self-attention (InstructBLIP)
    dropout: float = 0.0  # dropout inside the connector during training
    position_encoding: bool = True  # add a 2-D sin-cos code to image features (perceiver, qformer, c_abstractor)
    image_norm: bool = True  # Q-Former: LayerNorm on image features first (off for BLIP-2 weights, whose ViT has it)
    intermediate_size: int = 0  # Q-Former feed-forward width; 0 = 4 x its width
    text_vocab_size: int = 0  # Q-Former: own instruction vocabulary (InstructBLIP); 0 = instructions use LLM embeds
    max_text_positions: int = 512  # Q-Former with its own vocabulary: learned positions for instruction tokens


@dataclass
class LMConfig:
    name: str = "tiny-llama"  # preset in fovea.lm.LM_PRESETS, or "local" for `path`
    path: str | None = None  # a transformers model directory (config + safetensors + tokenizer)
    overrides: dict[str, Any] = field(default_factory=dict)  # transformers config overrides for presets
    dtype: str = "float32"  # parameter dtype: float32, bfloat16 or float16
    attention: str = "auto"  # fovea attention backend: auto, segments, dense, flex or flash_varlen


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image encoder
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)  # encoder features -> LLM tokens
    lm: LMConfig = field(default_factory=LMConfig)  # the decoder LLM
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # image loading and resizing
    image_token: str = "<image>"  # placeholder string in prompts; expanded to the visual-token count
    freeze_vision: bool = True  # encoder parameters get requires_grad=False
    freeze_connector: bool = False  # connector parameters get requires_grad=False
    freeze_lm: bool = True  # LLM parameters get requires_grad=False
    license: str | None = None  # licence of the weights this model came from, when the checkpoint states one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VLMConfig keys {sorted(unknown)}; known keys are {sorted(known)}")
        data = dict(data)
        vision = dict(data.pop("vision", {}))
        if "overrides" in vision:  # JSON turns tuples into lists; timm's layer specs are tuples
            vision["overrides"] = {k: tuple(v) if isinstance(v, list) else v for k, v in vision["overrides"].items()}
        if "pinpoints" in vision:
            vision["pinpoints"] = tuple(tuple(p) for p in vision["pinpoints"])
        connector = dict(data.pop("connector", {}))
        if connector.get("grid") is not None:
            connector["grid"] = tuple(connector["grid"])
        pre = dict(data.pop("preprocess", {}))
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(pre[key])
        return cls(
            vision=VisionConfig(**vision),
            connector=ConnectorConfig(**connector),
            lm=LMConfig(**data.pop("lm", {})),
            preprocess=PreprocessConfig(**pre),
            **data,
        )


# CLIP normalisation, used by the ViT baselines and FastViTHD (FastVLM feeds [0, 1] pixels; we keep CLIP's for both).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _preset(vision: str, connector: str, num_queries: int = 256, max_side: int = 1024, lm: str = "tiny-llama"):
    def make() -> VLMConfig:
        return VLMConfig(
            vision=VisionConfig(name=vision),
            connector=ConnectorConfig(name=connector, num_queries=num_queries),
            lm=LMConfig(name=lm),
            preprocess=PreprocessConfig(max_side=max_side, mean=CLIP_MEAN, std=CLIP_STD),
        )

    return make


def _reader_preset(connector: str, num_queries: int):
    def make() -> VLMConfig:
        # The reading encoder was trained on [0, 1] pixels (no normalisation) at 10-24 px text: a 2880x2160 page
        # resized to 1536 px puts body text there.
        return VLMConfig(
            vision=VisionConfig(name="fovea-reader", weights="bundled:reader"),
            connector=ConnectorConfig(name=connector, num_queries=num_queries, instruction_aware=True),
            lm=LMConfig(name="tiny-llama"),
            preprocess=PreprocessConfig(max_side=1536),
        )

    return make


# Named presets: each value builds a fresh config. The LLM defaults to a tiny random one; swap `lm` for real work.
PRESETS = {
    "fastvlm": _preset("fastvithd", "mlp", max_side=1024),  # FastVLM layout: FastViTHD + 2-layer MLP
    "fastvithd-perceiver-256": _preset("fastvithd", "perceiver", 256, max_side=1536),
    "fastvithd-qformer-64": _preset("fastvithd", "qformer", 64, max_side=1536),
    "fastvithd-cabstractor-256": _preset("fastvithd", "c_abstractor", 256, max_side=1536),
    "llava-next": _preset("vit-l14-336-anyres", "llava_next", max_side=1008),  # LLaVA-NeXT: AnyRes tiles, MLP, unpad
    "llava": _preset("vit-l14-336", "mlp", max_side=336),  # LLaVA-1.5 layout: one 336 px view + MLP
    # fovea's pretrained reading encoder (bundled weights) + an instruction-aware Q-Former of 64 / 256 queries
    "reader-qformer-64": _reader_preset("qformer", 64),
    "reader-qformer-256": _reader_preset("qformer", 256),
}


def settings_from_dict(cls, data: dict[str, Any], what: str, tuple_keys: tuple[str, ...] = ()):
    """A settings dataclass from a mapping (YAML, JSON, flags): an unknown key is a ValueError listing the known
    ones; ``tuple_keys`` come back as tuples (YAML and JSON give lists)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    data = dict(data)
    for key in tuple_keys:
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return cls(**data)


def field_comments(cls) -> dict[str, str]:
    """The comment written after each field of a settings dataclass (one per field, by convention): the text of
    its ``--flag``'s help, so the CLI and the code cannot disagree."""
    import inspect
    import re

    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*?\s#\s*(.*)$")
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                match = pattern.match(line)
                if match:
                    out[match.group(1)] = match.group(2)
    return out


def preset(name: str) -> VLMConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()
