"""The frozen encoder's output per page, computed once for a whole run (and kept on disk for the next runs over
the same pages with the same encoder): the encoder is frozen in both training stages, so every question about a
page, at every step, would otherwise encode the same pixels again. Samples then carry ``EncodedImage``s instead of
pixels, which also keeps a large dataset's pages out of memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fovea.model import EncodedImage
from fovea.packing import Sample

FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # how cached features are kept (bf16: half)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.hexdigest()


def encoder_fingerprint(model) -> str:
    """Which encoder made a feature: its registry name and a hash of its weights (features of another encoder, or
    of the same one after training, are never mixed up)."""
    parts = [model.config.vision.name.encode()]
    for name, tensor in sorted(model.encoder.state_dict().items()):
        parts += [name.encode(), tensor.detach().float().cpu().numpy().tobytes()]
    return _digest(*parts)


class FeatureCache:
    """``cache(sample)`` -> the sample with each image replaced by its cached ``EncodedImage``. Keys: the pixels'
    bytes and shape, and the encoder's fingerprint; values kept in memory and as ``<key>.safetensors`` under
    ``folder`` (written atomically; a file that does not load is named, never used)."""

    def __init__(self, model, folder: str | Path | None, dtype: str = "bf16") -> None:
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature cache dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
        self.model, self.dtype = model, FEATURE_DTYPES[dtype]
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = encoder_fingerprint(model)
        self.memory: dict[str, torch.Tensor] = {}
        self.last: tuple[torch.Tensor, str] | None = None  # the last pixels and their key: a page's next question
        self.encoded = self.loaded = self.reused = 0  # pages encoded now, read from disk, found in memory

    def __call__(self, sample: Sample) -> Sample:
        return replace(sample, images=[self.get(pixels) for pixels in sample.images])

    def get(self, pixels: torch.Tensor) -> EncodedImage:
        if self.last is not None and self.last[0] is pixels:  # the same tensor: no need to hash it again
            key = self.last[1]
        else:
            key = _digest(pixels.detach().cpu().contiguous().numpy().tobytes(), str(tuple(pixels.shape)).encode(),
                          str(self.dtype).encode(), self.fingerprint.encode())
            self.last = (pixels, key)
        if key in self.memory:
            self.reused += 1
        else:
            self.memory[key] = self._load(key) if self._on_disk(key) else self._encode(key, pixels)
        return EncodedImage(self.memory[key], tuple(pixels.shape))

    def _on_disk(self, key: str) -> bool:
        return self.folder is not None and (self.folder / f"{key}.safetensors").is_file()

    def _load(self, key: str) -> torch.Tensor:
        path = self.folder / f"{key}.safetensors"
        try:
            features = load_file(str(path))["features"]
        except (SafetensorError, KeyError, OSError) as err:
            raise ValueError(f"cached encoder features {str(path)!r} are corrupt ({err}); delete the file") from None
        self.loaded += 1
        return features

    def _encode(self, key: str, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.encode([pixels.to(self.model.device)])[0].to("cpu", self.dtype).contiguous()
        self.encoded += 1
        if self.folder is not None:
            path = self.folder / f"{key}.safetensors"
            part = path.with_suffix(f".{os.getpid()}.part")
            save_file({"features": features}, str(part))
            os.replace(part, path)
        return features
