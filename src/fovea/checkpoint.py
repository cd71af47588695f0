"""Saving and loading whole models: fovea's own directory format, and transformers checkpoints through
``fovea.interop``'s converters. The VLM itself knows nothing of files.

A fovea directory holds ``config.json`` (the fovea config, the LLM's transformers config, a format version),
``model.safetensors`` (every weight under fovea's names) and the tokenizer (plus the Q-Former's own tokenizer in
``instruction_tokenizer/`` when it has one).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from fovea.config import VLMConfig
from fovea.connectors import build_connector
from fovea.interop import Converted, convert_checkpoint
from fovea.lm import lm_from_config_dict
from fovea.model import VLM
from fovea.vision import build_encoder

CONFIG_NAME, WEIGHTS_NAME, FORMAT_VERSION = "config.json", "model.safetensors", 1
INSTRUCTION_TOKENIZER_DIR = "instruction_tokenizer"  # the Q-Former's own tokenizer, when it has one

log = logging.getLogger(__name__)


def save_model(model: VLM, path: str | Path) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer to ``path`` (written to a temporary
    directory first and renamed, so an interrupted save never leaves a half-written model)."""
    from safetensors.torch import save_model as save_weights

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp-save")
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "fovea": model.config.to_dict(), "lm_config": model.lm.config.to_dict()}
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
    save_weights(model, str(tmp / WEIGHTS_NAME))
    model.tokenizer.save_pretrained(tmp)
    if model.instruction_tokenizer is not None:
        model.instruction_tokenizer.save_pretrained(tmp / INSTRUCTION_TOKENIZER_DIR)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def load_model(path: str | Path) -> VLM:
    """Load a directory written by ``save_model``, or one written by transformers' ``save_pretrained`` for a
    supported model type (FastVLM, LLaVA, LLaVA-NeXT; see ``fovea.interop``), converted on the fly. Every weight
    must match (strict); a checkpoint's licence is logged as a warning."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ValueError(f"{str(path)!r} is not a model directory (it has no {CONFIG_NAME})")
    meta = json.loads((path / CONFIG_NAME).read_text())
    parts = _read_own(path, meta) if "fovea" in meta else convert_checkpoint(path)
    return assemble(parts)


def _read_own(path: Path, meta: dict[str, Any]) -> Converted:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path / CONFIG_NAME)!r} has format_version {meta.get('format_version')!r}; "
                         f"this fovea reads {FORMAT_VERSION}")
    if not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{str(path)!r} has no {WEIGHTS_NAME}")
    config = VLMConfig.from_dict(meta["fovea"])
    config.vision.weights = None  # the encoder's weights are in model.safetensors
    extra = path / INSTRUCTION_TOKENIZER_DIR
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except Exception as err:
        raise ValueError(f"cannot read {str(path / WEIGHTS_NAME)!r}: {err}") from None
    return Converted(config=config, lm_config=meta["lm_config"], tokenizer=AutoTokenizer.from_pretrained(path),
                     state=state, source=str(path),
                     instruction_tokenizer=AutoTokenizer.from_pretrained(extra) if extra.is_dir() else None)


def assemble(parts: Converted) -> VLM:
    """Build the parts from ``parts.config`` (the LLM from its transformers config dict) and load ``parts.state``
    (fovea keys) strictly: a missing or unexpected key, or a shape that differs, is a ValueError naming them."""
    config, state = parts.config, dict(parts.state)
    lm = lm_from_config_dict(parts.lm_config, config.lm.dtype)
    encoder = build_encoder(config.vision)
    connector = build_connector(config.connector, in_channels=encoder.channels, out_dim=lm.config.hidden_size)
    model = VLM(config, encoder=encoder, connector=connector, lm=lm, tokenizer=parts.tokenizer,
                instruction_tokenizer=parts.instruction_tokenizer)
    _check_keys(model, state, parts.source)
    model.load_state_dict(state, strict=False)
    if config.license:
        log.warning("the weights in %s are under the licence %r; check its terms before use", parts.source,
                    config.license)
    return model


def _check_keys(model: VLM, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    tied: set[str] = set()
    if getattr(model.lm.config, "tie_word_embeddings", False):
        # Tied embeddings are stored once, under either name (safetensors keeps one of the two).
        weight = model.lm.get_input_embeddings().weight
        embed = next(f"lm.{n}" for n, p in model.lm.named_parameters() if p is weight)
        tied = {"lm.lm_head.weight", embed}
        if embed not in state and "lm.lm_head.weight" in state:
            state[embed] = state["lm.lm_head.weight"]
        tied.discard(embed)
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {source!r} does not match its config: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:4]}")
