"""The encoder contract and its registry.

Notation: B images, 3 colour channels, H x W input pixels, C feature channels, h x w feature grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fovea.config import VisionConfig
from fovea.registry import Registry


class Encoder(nn.Module):
    """A vision encoder: ``features(pixels (B,3,H,W)) -> (B,C,h,w)``.

    Subclasses set ``stride`` (input pixels per feature cell along each side) and ``channels`` (C), and may
    override ``input_size`` (how an image is resized before encoding) and ``grid``.
    """

    stride: int
    channels: int
    # How this family runs in bf16/fp16, chosen by measurement (docs/benchmarks.md, precision section): "weights"
    # casts the parameters (FastViTHD: 3.3-3.5x fp32 with channels_last); "autocast" keeps fp32 weights and
    # autocasts the forward (MCi0-sized hybrids: bf16 weights measured 0.87x fp32, autocast 2.1x).
    low_precision: str = "weights"
    # Convolutional encoders run channels_last in bf16 (FastViTHD: no gain from bf16 without it). In fp32 it gained
    # nothing on an AVX2 EPYC (1.00-1.04x), so fp32 keeps the default layout.
    channels_last: bool = False

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)

    def reparameterize(self) -> dict:
        """Fuse multi-branch blocks into their single-branch inference form, in place (same outputs, less work).
        Returns the constructor overrides that rebuild the fused structure (empty when nothing changed)."""
        return {}

    def check_input(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encoder expects pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        height, width = pixels.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image size {width}x{height} (WxH) is not a multiple of the encoder stride {self.stride}; "
                "resize with fovea.preprocess first"
            )

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) for an input of ``height`` x ``width`` pixels (both multiples of the stride)."""
        return height // self.stride, width // self.stride

    def num_tokens(self, height: int, width: int) -> int:
        h, w = self.grid(height, width)
        return h * w

    def input_size(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        """Pixel size (H, W) an image of ``height`` x ``width`` is brought to: long side scaled to at most
        ``max_side`` with the aspect ratio kept, each side rounded up to a multiple of the stride (padding)."""
        scale = max_side / max(height, width)
        if not upscale:
            scale = min(scale, 1.0)
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        return _round_up(h, self.stride), _round_up(w, self.stride)

    def compose(self, image, content: tuple[int, int], size: tuple[int, int], cfg) -> torch.Tensor:
        """The input tensor (3,H,W) for one decoded image: resized to ``content`` and padded to ``size``. Encoders
        with their own input layout (AnyRes tiles plus a base view) override it."""
        from fovea.preprocess.image import to_tensor

        return to_tensor(image, content=content, size=size, cfg=cfg)

    def resized_content(self, height: int, width: int, max_side: int, upscale: bool = False) -> tuple[int, int]:
        """Size the image content is resized to before padding up to ``input_size``."""
        scale = max_side / max(height, width)
        if not upscale:
            scale = min(scale, 1.0)
        return max(1, round(height * scale)), max(1, round(width * scale))


def place_encoder(encoder: Encoder, device: torch.device | str, dtype: torch.dtype) -> torch.dtype | None:
    """Move ``encoder`` to ``device`` for computing in ``dtype`` by its family's measured recipe
    (``low_precision``, ``channels_last``). Returns the autocast dtype to run it under (None: its weights' dtype)."""
    low = dtype != torch.float32
    autocast = low and encoder.low_precision == "autocast"
    encoder.to(device=device, dtype=torch.float32 if autocast else dtype)
    encoder.to(memory_format=torch.channels_last if low and encoder.channels_last else torch.contiguous_format)
    return dtype if autocast else None


def run_encoder(encoder: Encoder, pixels: torch.Tensor, autocast: torch.dtype | None) -> torch.Tensor:
    """``encoder.features`` in the placement ``place_encoder`` chose: (B,3,H,W) -> (B,C,h,w)."""
    weights = next(encoder.parameters())
    low = autocast is not None or weights.dtype != torch.float32
    layout = torch.channels_last if low and encoder.channels_last else torch.contiguous_format
    pixels = pixels.to(weights.device, weights.dtype).contiguous(memory_format=layout)
    with torch.autocast(weights.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return encoder.features(pixels)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


EncoderBuilder = Callable[[VisionConfig], Encoder]
_ENCODERS: Registry[EncoderBuilder] = Registry("encoder")


def register_encoder(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    return _ENCODERS.register(name)


def available_encoders() -> list[str]:
    return _ENCODERS.names()


# Weights that ship inside the package, named in configs as "bundled:<name>" so saved configs stay portable.
BUNDLED_PREFIX = "bundled:"
_BUNDLED = {"reader": "weights/reader/encoder.safetensors"}


def bundled_reader_dir() -> Path:
    """The folder of the bundled reading encoder (``fovea pretrain`` output: encoder, probe head, settings)."""
    return Path(__file__).resolve().parent.parent / "weights" / "reader"


def resolve_weights(spec: str) -> str:
    """A weights path: ``bundled:<name>`` -> the file inside the package; anything else is a local path."""
    if not spec.startswith(BUNDLED_PREFIX):
        return spec
    name = spec.removeprefix(BUNDLED_PREFIX)
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled weights {spec!r}; available: {[BUNDLED_PREFIX + k for k in _BUNDLED]}")
    path = Path(__file__).resolve().parent.parent / _BUNDLED[name]
    if not path.is_file():
        raise ValueError(f"bundled weights {spec!r} are missing from this installation ({path})")
    return str(path)


def build_encoder(cfg: VisionConfig) -> Encoder:
    encoder = _ENCODERS.get(cfg.name)(cfg)
    if cfg.weights:
        load_encoder_weights(encoder, resolve_weights(cfg.weights))
    return encoder


def load_encoder_weights(encoder: Encoder, path: str) -> None:
    """Load pretrained weights from a local file (safetensors or a torch state dict); keys may be those of the
    timm model itself (``model.``-prefixed or bare)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"encoder weights file {path!r} does not exist")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as err:  # noqa: BLE001  (safetensors and pickle raise many kinds; all mean "unreadable")
        raise ValueError(f"encoder weights file {path!r} is corrupt or not a weights file: {err}") from err
    target = encoder.model if hasattr(encoder, "model") else encoder
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape mismatch: weights of another architecture
        raise ValueError(f"encoder weights {path!r} do not fit encoder {type(target).__name__}: {err}") from err
    missing = list(result.missing_keys)
    if missing:
        raise ValueError(f"encoder weights {path!r} are missing {len(missing)} keys, e.g. {missing[:5]}")
