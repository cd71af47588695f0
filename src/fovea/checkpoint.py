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


# ----- bundles: a trained bridge (and LoRA adapters) over parts that come from elsewhere -------------------------
BUNDLE_NAME, BRIDGE_NAME, ADAPTER_DIR = "bundle.json", "bridge.safetensors", "adapter"


def export_bundle(run: str | Path, out: str | Path, *, encoder_weights: str = "bundled:reader",
                  card: dict[str, Any] | None = None) -> Path:
    """A training run's trained parts, small enough to ship: the bridge's weights in bf16 (``bridge.safetensors``)
    and the LoRA adapters unmerged (``adapter/``, peft's format), with the model's config in ``bundle.json``. The
    encoder and the LLM are named, not copied: ``encoder_weights`` must hold exactly the run's (frozen) encoder
    (checked), and the LLM must be one that loads by name or path (SmolLM2, a local directory). ``run``: a
    ``fovea train`` folder (its ``final/`` and, after a LoRA finetune, ``adapter/``). ``card``: facts recorded in
    the bundle (licence, provenance, training commands)."""
    from safetensors.torch import load_file, save_file

    run, out = Path(run), Path(out)
    if not (run / "final" / CONFIG_NAME).is_file():
        raise ValueError(f"{str(run)!r} holds no finished training run (no final/{CONFIG_NAME})")
    meta = json.loads((run / "final" / CONFIG_NAME).read_text())
    config = VLMConfig.from_dict(meta["fovea"])
    if config.lm.name != "smollm2" and not config.lm.path:
        raise ValueError(f"a bundle names its LLM instead of copying it: {config.lm.name!r} is a random preset")
    state = load_file(str(run / "final" / WEIGHTS_NAME))
    config.vision.overrides = {k: v for k, v in config.vision.overrides.items() if k != "inference_mode"}
    config.vision.weights = encoder_weights
    encoder = build_encoder(config.vision)  # unfused, as the weights file holds it; loading fuses it again
    if "inference_mode" in meta["fovea"]["vision"].get("overrides", {}):  # the run kept the encoder fused
        encoder.reparameterize()
    named = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    trained = {k: v for k, v in state.items() if k.startswith("encoder.")}
    if set(named) != set(trained) or any(
            not torch.allclose(named[k].to(trained[k].dtype), trained[k], rtol=1e-6, atol=1e-7) for k in named):
        raise ValueError(f"the encoder weights {encoder_weights!r} are not the encoder {str(run)!r} was trained "
                         "with (a bundle names its encoder: it must be exactly the run's)")
    bridge = {k.removeprefix("connector."): v.to(torch.bfloat16).contiguous() for k, v in state.items()
              if k.startswith("connector.")}
    tmp = out.with_name(out.name + ".tmp-save")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(bridge, str(tmp / BRIDGE_NAME), metadata={k: str(v) for k, v in (card or {}).items()})
    if (run / ADAPTER_DIR).is_dir():
        shutil.copytree(run / ADAPTER_DIR, tmp / ADAPTER_DIR)
    (tmp / BUNDLE_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION, "fovea": config.to_dict(),
                                               "card": card or {}}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_bundle(path: str | Path) -> VLM:
    """A bundle written by ``export_bundle``: the model built from its config (bundled encoder weights, the local
    SmolLM2), the bridge loaded strictly, the LoRA adapters merged into the LLM. A missing or unreadable file is a
    ValueError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (BUNDLE_NAME, BRIDGE_NAME):
        if not (path / name).is_file():
            raise ValueError(f"the model bundle {str(path)!r} is missing {name} (`fovea bundle` writes one)")
    try:
        meta = json.loads((path / BUNDLE_NAME).read_text())
        config = VLMConfig.from_dict(meta["fovea"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the model bundle's {str(path / BUNDLE_NAME)!r} is corrupt: {err}") from None
    try:
        bridge = load_file(str(path / BRIDGE_NAME))
    except Exception as err:  # noqa: BLE001  (safetensors raises several kinds; all mean "unreadable")
        raise ValueError(f"the model bundle's bridge weights {str(path / BRIDGE_NAME)!r} are corrupt: {err}") from None
    model = VLM.from_config(config)
    expected = model.connector.state_dict()
    if set(bridge) != set(expected) or any(bridge[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"the bridge weights {str(path / BRIDGE_NAME)!r} do not fit the bundle's connector "
                         f"{config.connector.name!r}")
    model.connector.load_state_dict({k: v.float() for k, v in bridge.items()})
    adapter = path / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        try:
            model.lm = PeftModel.from_pretrained(model.lm, str(adapter)).merge_and_unload()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"the model bundle's LoRA adapters {str(adapter)!r} do not load: {err}") from None
    return model
