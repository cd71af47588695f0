"""Reading transformers checkpoint directories: config, weights (single or sharded), preprocessing settings,
tokenizer and licence. Every converter builds on these; none of them downloads anything."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fovea.config import PreprocessConfig, VLMConfig


@dataclass
class Converted:
    """A checkpoint read into fovea's terms, ready for ``fovea.checkpoint.assemble``."""

    config: VLMConfig  # the fovea config the weights belong to
    lm_config: dict[str, Any]  # the LLM's transformers config, as a dict
    tokenizer: Any  # the LLM's tokenizer, with the image placeholder
    state: dict[str, torch.Tensor]  # every weight, under fovea's names
    source: str  # where it was read from, for error messages
    instruction_tokenizer: Any = None  # a Q-Former's own tokenizer (InstructBLIP), if it has one

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{str(path)!r} has no config.json: not a model directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint directory: model.safetensors, sharded safetensors (index), or torch .bin."""
    path = Path(path)
    found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        raise ValueError(f"{str(path)!r} holds no weights; expected one of {list(WEIGHT_FILES)}")
    if found.name.endswith(".index.json"):
        shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} is incomplete: shard files {missing} are missing")
        files = [path / s for s in shards]
    else:
        files = [found]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(file)))
            else:
                state.update(torch.load(str(file), map_location="cpu", weights_only=True))
        except Exception as err:  # a truncated or foreign file: say which one
            raise ValueError(f"cannot read weights file {str(file)!r}: {err}") from None
    return state


def rename(state: dict[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply prefix rewrites (first matching rule wins) to every key."""
    rules = list(rules)
    out = {}
    for key, value in state.items():
        for old, new in rules:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under ``prefix`` (prefix stripped)."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state.pop(k) for k in keys}


def read_license(path: str | Path) -> str | None:
    """The licence a checkpoint states: ``license`` in config.json, else the model card's front matter."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value:
            return str(value)
    card = path / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
        if match:
            fields = dict(re.findall(r"^(license(?:_name|_link)?):\s*(.+?)\s*$", match.group(1), re.M))
            if "license" in fields:
                extra = fields.get("license_name") or fields.get("license_link")
                return fields["license"].strip("'\"") + (f" ({extra.strip()})" if extra else "")
    return None


def read_image_processor(path: str | Path) -> dict[str, Any]:
    """The saved image-processor settings, if any (preprocessor_config.json, or processor_config.json)."""
    path = Path(path)
    if (path / "preprocessor_config.json").is_file():
        return json.loads((path / "preprocessor_config.json").read_text())
    if (path / "processor_config.json").is_file():
        return dict(json.loads((path / "processor_config.json").read_text()).get("image_processor", {}))
    return {}


def preprocess_config(settings: dict[str, Any], *, side: int, mean, std, square: bool, pad_position: str,
                      pad_value: float | None = None, center_crop: bool = False) -> PreprocessConfig:
    """fovea's preprocessing from a saved image processor's settings, with the family's defaults where the
    directory has none."""
    if settings.get("do_normalize", True):
        mean = tuple(settings.get("image_mean", mean))
        std = tuple(settings.get("image_std", std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = settings.get("crop_size") or settings.get("size") or {}
    if isinstance(size, dict):
        side = int(size.get("height") or size.get("shortest_edge") or side)
    elif isinstance(size, int):
        side = size
    # LLaVA pads to a square with the mean colour; fovea's pad value is one grey level, the channel mean's mean.
    value = sum(mean) / 3 if pad_value is None else pad_value
    return PreprocessConfig(max_side=side, upscale=True, mean=mean, std=std, square=square and not center_crop,
                            center_crop=center_crop, pad_position=pad_position, pad_value=value)


def load_tokenizer(path: str | Path, image_token_id: int):
    """The checkpoint's tokenizer (with its chat template) and the string of its image token."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise ValueError(f"{str(path)!r} has no loadable tokenizer (save the processor or tokenizer with the "
                         f"model): {err}") from None
    if tokenizer.chat_template is None:
        for name in ("chat_template.jinja", "chat_template.json"):
            file = path / name
            if file.is_file():
                text = file.read_text()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith("json") else text
                break
    token = tokenizer.convert_ids_to_tokens(int(image_token_id))
    if token is None or image_token_id >= len(tokenizer):
        raise ValueError(f"the tokenizer in {str(path)!r} has no image token id {image_token_id} "
                         f"(vocabulary of {len(tokenizer)})")
    return tokenizer, token
