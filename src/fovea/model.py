"""The VLM: encode images -> compress to visual tokens -> merge into the prompt -> LLM.

Notation: B sequences, L tokens, C encoder channels, h x w feature grid, Q visual tokens per image, D LLM width,
N visual tokens in a batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fovea.attention import PREFIX, use_backend
from fovea.config import VLMConfig
from fovea.connectors import Connector, build_connector
from fovea.lm import build_lm
from fovea.merge import merge_visual_tokens
from fovea.packing import PackedBatch
from fovea.preprocess import ImageProcessor, Processor
from fovea.vision import Encoder, build_encoder
from fovea.vision.base import place_encoder, run_encoder


def _group_by_shape(tensors: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[tuple(t.shape)].append(i)
    return groups


def image_layouts(
    pixels: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]] | None
) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """Per image, (preprocessed size, original size): what ``VLM.compress`` needs to lay tokens out."""
    if image_sizes is None:
        return None
    if len(image_sizes) != len(pixels):
        raise ValueError(f"{len(image_sizes)} image sizes for {len(pixels)} images")
    return [(tuple(p.shape[-2:]), tuple(int(v) for v in size)) for p, size in zip(pixels, image_sizes, strict=True)]


ENCODER_RUNTIMES = ("torch", "openvino")


class EncodedImage:
    """An image whose frozen encoder's output is already known: it stands in for the (3,H,W) pixels in a sample or
    batch, so training over many questions about the same page encodes it once (and holds no pixels)."""

    def __init__(self, features: torch.Tensor, pixel_shape: tuple[int, ...]) -> None:
        self.features = features  # (C,h,w) the encoder's output for these pixels
        self.shape = torch.Size(pixel_shape)  # (3,H,W) of the preprocessed pixels it came from (layouts need it)

    def to(self, device: torch.device | str) -> EncodedImage:
        return EncodedImage(self.features.to(device), self.shape)


def add_image_token(lm: nn.Module, tokenizer: Any, image_token: str) -> None:
    """Give the tokenizer the image placeholder if it lacks it, and the LLM an embedding row for every token."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)


class VLM(nn.Module):
    def __init__(
        self, config: VLMConfig, *, encoder: Encoder, connector: Connector, lm: nn.Module, tokenizer: Any,
        instruction_tokenizer: Any = None,
    ):
        super().__init__()
        self.config, self.tokenizer = config, tokenizer
        # A Q-Former with its own vocabulary (InstructBLIP) reads instructions tokenized by its own tokenizer.
        self.instruction_tokenizer = instruction_tokenizer
        if connector.has_own_vocabulary and instruction_tokenizer is None:
            raise ValueError("this Q-Former has its own instruction vocabulary: pass its tokenizer as "
                             "instruction_tokenizer")
        self.encoder, self.connector, self.lm = encoder, connector, lm
        # The encoder's compute dtype when its family autocasts (fp32 weights); None = it runs in its weights' dtype.
        self.encoder_autocast: torch.dtype | None = None
        # An OpenVINO runner for the encoder's forward (``place(..., encoder_runtime="openvino")``); None = torch.
        self.encoder_runner: Any = None
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        use_backend(lm, config.lm.attention)
        self.set_trainable(
            vision=not config.freeze_vision, connector=not config.freeze_connector, lm=not config.freeze_lm
        )

    # ----- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VLMConfig, *, instruction_tokenizer: Any = None) -> VLM:
        """Build every part from its config: encoder and connector random (or encoder weights from a local file),
        the LLM from its preset or directory; the image placeholder is added to the tokenizer if missing.
        ``instruction_tokenizer``: the tokenizer of a Q-Former with its own vocabulary (InstructBLIP's)."""
        lm, tokenizer = build_lm(config.lm)
        add_image_token(lm, tokenizer, config.image_token)
        encoder = build_encoder(config.vision)
        connector = build_connector(config.connector, in_channels=encoder.channels, out_dim=lm.config.hidden_size)
        return cls(config, encoder=encoder, connector=connector, lm=lm, tokenizer=tokenizer,
                   instruction_tokenizer=instruction_tokenizer)

    def set_trainable(self, *, vision: bool, connector: bool, lm: bool) -> None:
        """The one freeze policy: which parts get gradients. Frozen parts also stay in eval mode (BatchNorm,
        dropout) when the model is put in training mode."""
        self._trainable = {"encoder": vision, "connector": connector, "lm": lm}
        for name, flag in self._trainable.items():
            getattr(self, name).requires_grad_(flag)
        self.train(self.training)

    def train(self, mode: bool = True) -> VLM:
        super().train(mode)
        for name, flag in getattr(self, "_trainable", {}).items():
            if not flag:
                getattr(self, name).eval()
        return self

    def reparameterize_encoder(self) -> VLM:
        """Fuse the encoder's multi-branch blocks for inference (FastViT: several times fewer convolutions). The
        config records it, so a saved model reloads in the fused form. Fusing a fused encoder changes nothing."""
        if self.config.vision.overrides.get("inference_mode"):
            return self
        overrides = self.encoder.reparameterize()
        self.config.vision.overrides.update(overrides)
        if self.encoder_runner is not None:
            self.encoder_runner.reset()  # compiled from the unfused encoder
        return self

    def place(self, device: torch.device | str, dtype: torch.dtype, encoder_runtime: str = "torch") -> VLM:
        """Move every stage to ``device`` and run it in ``dtype`` by the recipe measured fastest for it: the LLM
        and connector cast their weights (the engine's KV cache follows the LLM); the encoder casts its weights or
        keeps fp32 weights under autocast, as its family says (``Encoder.low_precision``), channels_last for
        convolutional encoders in low precision. The saved config is untouched: placement is not a model property.
        Choose ``device``/``dtype`` with ``fovea.runtime.placement`` (it checks what the hardware can run).
        ``encoder_runtime="openvino"`` runs the encoder's forward through OpenVINO (CPU only; fp32 weights kept)."""
        if encoder_runtime not in ENCODER_RUNTIMES:
            raise ValueError(f"unknown encoder runtime {encoder_runtime!r}; available: {ENCODER_RUNTIMES}")
        device = torch.device(device)
        if encoder_runtime == "openvino" and device.type != "cpu":
            raise ValueError(f"encoder runtime 'openvino' runs on the CPU, not on {device}")
        self.lm.to(device=device, dtype=dtype)
        self.connector.to(device=device, dtype=dtype)
        self.encoder_runner = None
        if encoder_runtime == "openvino":
            from fovea.vision.openvino import OpenVINORunner

            self.encoder_autocast = place_encoder(self.encoder, device, torch.float32)
            self.encoder_runner = OpenVINORunner(self.encoder, threads=torch.get_num_threads(), dtype=dtype)
        else:
            self.encoder_autocast = place_encoder(self.encoder, device, dtype)
        use_backend(self.lm, self.config.lm.attention)  # the best attention backend depends on the device
        return self

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----- the one token-count function, shared with the processor ---------------------------------------------
    def num_visual_tokens(self, height: int, width: int, original_size: tuple[int, int] | None = None) -> int:
        """Visual tokens the LLM receives for an image preprocessed to ``height`` x ``width`` pixels, whose decoded
        size was ``original_size`` (only LLaVA-NeXT's layout depends on it; default: the preprocessed size)."""
        h, w = self.encoder.grid(height, width)
        return self.connector.num_image_tokens(h, w, (height, width), original_size or (height, width))

    def processor(self) -> Processor:
        image_processor = ImageProcessor(encoder=self.encoder, cfg=self.config.preprocess)
        return Processor(tokenizer=self.tokenizer, image_processor=image_processor,
                         num_visual_tokens=self.num_visual_tokens, image_token=self.config.image_token,
                         instruction_tokenizer=self.instruction_tokenizer)

    # ----- stages -----------------------------------------------------------------------------------------------
    def encode(self, pixels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features per image: [(3,H_i,W_i)] -> [(C,h_i,w_i)]. Images of equal size run as one batch;
        different sizes are never padded to the largest."""
        out: list[torch.Tensor | None] = [None] * len(pixels)
        for _, idx in _group_by_shape(pixels).items():
            batch = torch.stack([pixels[i] for i in idx])  # (b,3,H,W)
            if self.encoder_runner is not None:
                feats = self.encoder_runner(batch).to(self.device)  # (b,C,h,w)
            else:
                feats = run_encoder(self.encoder, batch, self.encoder_autocast)  # (b,C,h,w)
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out  # type: ignore[return-value]

    def compress(
        self,
        features: Sequence[torch.Tensor],
        instructions: Sequence[torch.Tensor] | None = None,
        layouts: Sequence[tuple[tuple[int, int], tuple[int, int]]] | None = None,
    ) -> list[torch.Tensor]:
        """Visual tokens per image: [(C,h_i,w_i)] -> [(Q_i,D)], grouped by grid shape. ``layouts`` gives each
        image's (preprocessed size, original size), needed by connectors whose layout depends on it."""
        if self.connector.needs_image_size and (layouts is None or len(layouts) != len(features)):
            raise ValueError(f"connector {self.config.connector.name!r} needs each image's preprocessed and original "
                             "size: pass image_sizes (PreparedImage.original_size) with the pixels")
        out: list[torch.Tensor | None] = [None] * len(features)
        for grid, idx in _group_by_shape(features).items():
            feats = torch.stack([features[i] for i in idx]).to(self.connector_dtype)  # (b,C,h,w)
            tokens = self.connector(feats, **self._instruction_inputs(instructions, idx))  # (b,Q,D)
            for j, i in enumerate(idx):
                out[i] = self.connector.arrange(tokens[j], grid[-2:], *layouts[i]) if layouts else tokens[j]
        return out  # type: ignore[return-value]

    def image_tokens(
        self,
        pixels: Sequence[torch.Tensor],
        instructions: Sequence[torch.Tensor] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        timings: dict[str, float] | None = None,
        features: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Visual tokens per image, [(3,H_i,W_i)] -> [(Q_i,D)]: encode, then compress. ``image_sizes``: each
        image's original (h, w). ``timings``, when given, receives ``encode_s`` and ``compress_s`` (the engine
        reports them per request). ``features``: the images' encoder output when the caller has it (the engine's
        encoder cache): encoding is skipped."""
        if not pixels:
            return []
        t0 = time.perf_counter()
        if features is None:
            features = self._encode_missing(pixels)
        t1 = time.perf_counter()
        tokens = self.compress(features, instructions, image_layouts(pixels, image_sizes))
        if timings is not None:
            timings["encode_s"], timings["compress_s"] = t1 - t0, time.perf_counter() - t1
        return tokens

    def _encode_missing(self, pixels: Sequence[torch.Tensor | EncodedImage]) -> list[torch.Tensor]:
        """Features per image: encoded now, or taken from an ``EncodedImage`` (in the connector's dtype)."""
        raw = [i for i, p in enumerate(pixels) if not isinstance(p, EncodedImage)]
        fresh = iter(self.encode([pixels[i] for i in raw])) if raw else iter(())
        return [p.features.to(self.device, self.connector_dtype) if isinstance(p, EncodedImage) else next(fresh)
                for p in pixels]

    def visual_tokens(
        self,
        pixels: Sequence[torch.Tensor],
        instructions: Sequence[torch.Tensor] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """All images' visual tokens in prompt order: (N, D). ``image_sizes``: each image's original (h, w)."""
        if not pixels:
            return torch.empty(0, self.lm.config.hidden_size, device=self.device, dtype=self.lm.dtype)
        return torch.cat(self.image_tokens(pixels, instructions, image_sizes), dim=0)

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the visual tokens scattered over the placeholders: (..., L) -> (..., L, D)."""
        return merge_visual_tokens(self.lm.get_input_embeddings()(input_ids), input_ids, self.image_token_id, visual)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: Sequence[torch.Tensor] = (),
        instructions: Sequence[torch.Tensor] | None = None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        **lm_kwargs: Any,
    ):
        """``input_ids`` (B,L) with expanded placeholders; ``pixel_values`` the images in placeholder order and
        ``image_sizes`` their original (h, w); ``lm_kwargs`` (labels, position_ids, attention_mask,
        past_key_values, packing metadata...) go to the LLM."""
        visual = self.visual_tokens(pixel_values, instructions, image_sizes)  # (N,D)
        inputs_embeds = self.embed(input_ids, visual)  # (B,L,D)
        return self.lm(inputs_embeds=inputs_embeds, **lm_kwargs)

    def forward_packed(self, batch: PackedBatch, **lm_kwargs: Any):
        """One packed stream (``fovea.packing.pack``) through the model: logits (1,T,V), loss over its labels."""
        if not self.lm.config._attn_implementation.startswith(PREFIX):
            raise ValueError(f"packed batches need a fovea attention backend, the LLM uses "
                             f"{self.lm.config._attn_implementation!r}; call fovea.attention.use_backend(model.lm)")
        return self(batch.input_ids[None].to(self.device), batch.images, batch.instructions or None,
                    batch.image_sizes, **batch.lm_kwargs(), **lm_kwargs)

    @torch.no_grad()
    def attention_maps(
        self, pixels: Sequence[torch.Tensor], instructions: Sequence[torch.Tensor] | None = None,
        features: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """Per image, where the connector's queries looked: an (h_i,w_i) map over the encoder grid summing to 1
        (Q-Former, Perceiver), or None for connectors without queries. ``features``: the images' encoder output
        when the caller has it (the engine's encoder cache)."""
        out: list[torch.Tensor | None] = []
        for i, grid in enumerate(self.encode(pixels) if features is None else features):
            feats = grid[None].to(self.connector_dtype)  # (1,C,h,w)
            found = self.connector.attention_map(feats, **self._instruction_inputs(instructions, [i]))
            out.append(None if found is None else found[0].float())
        return out

    def _instruction_inputs(self, instructions: Sequence[torch.Tensor] | None, idx: Sequence[int]) -> dict:
        """The connector's instruction arguments for images ``idx``: the LLM's embeddings of their instructions, or
        ids in the Q-Former's own vocabulary; nothing when the connector reads no instruction."""
        if not instructions or not self.config.connector.instruction_aware:
            return {}
        ids, mask = self._instruction_ids([instructions[i] for i in idx])  # (b,L)
        if self.connector.has_own_vocabulary:
            return {"text_ids": ids, "text_mask": mask}
        return {"text_embeds": self.lm.get_input_embeddings()(ids).to(self.connector_dtype), "text_mask": mask}

    def _instruction_ids(self, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(1, max(len(t) for t in ids))
        padded = torch.full((len(ids), longest), 0, dtype=torch.long, device=self.device)  # (b,L)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool, device=self.device)
        for i, t in enumerate(ids):
            padded[i, : len(t)], mask[i, : len(t)] = t, True
        return padded, mask

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype
