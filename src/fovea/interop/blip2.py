"""BLIP-2 and InstructBLIP Q-Former weights (transformers ``Blip2ForConditionalGeneration``, ``Blip2Model``,
``Blip2QFormerModel``, ``InstructBlipForConditionalGeneration``, ``InstructBlipQFormerModel``) -> fovea's
``QFormer``, whose parameter layout follows BLIP-2's.

Notation: E Q-Former width, C image feature width, D LLM width, Q query tokens.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fovea.connectors.resampler import QFormer
from fovea.interop.common import read_config, read_state

FULL_MODELS = ("blip-2", "instructblip")
QFORMER_MODELS = ("blip_2_qformer", "instructblip_qformer")

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_LAYER_NAMES = [  # transformers name inside a layer -> fovea name (first match wins)
    ("attention.attention.", "attention."), ("attention.output.dense.", "attention.dense."),
    ("attention.output.LayerNorm.", "attention.norm."),
    ("crossattention.attention.", "crossattention."), ("crossattention.output.dense.", "crossattention.dense."),
    ("crossattention.output.LayerNorm.", "crossattention.norm."),
    ("intermediate_query.dense.", "ffn_query.intermediate."), ("output_query.dense.", "ffn_query.output."),
    ("output_query.LayerNorm.", "ffn_query.norm."),
    ("intermediate.dense.", "ffn_text.intermediate."), ("output.dense.", "ffn_text.output."),
    ("output.LayerNorm.", "ffn_text.norm."),
]
_TOP_NAMES = [
    ("layernorm.", "layernorm."), ("embeddings.layernorm.", "layernorm."),
    ("embeddings.word_embeddings.", "word_embeddings."), ("embeddings.position_embeddings.", "position_embeddings."),
]


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # fovea parameter names that took checkpoint weights
    fresh: list[str] = field(default_factory=list)  # fovea parameters the checkpoint does not have (kept as is)
    skipped: list[str] = field(default_factory=list)  # checkpoint tensors whose shape differs (skip_mismatched)


def qformer_state(state: dict[str, torch.Tensor], *, full: bool) -> dict[str, torch.Tensor]:
    """transformers keys -> fovea ``QFormer`` keys. ``full``: keys of a whole BLIP-2/InstructBLIP model, whose
    vision tower and LLM are not the Q-Former's and are left out; any other unknown key is an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if full:
            if key.startswith(("vision_model.", "language_model.")) and not key.startswith(
                    "vision_model.post_layernorm."):
                continue
            if key == "query_tokens":
                out["query_tokens"] = value
                continue
            if key.startswith("language_projection."):
                out["proj_out." + key.split(".", 1)[1]] = value
                continue
            if key.startswith("vision_model.post_layernorm."):
                # BLIP-2 feeds the Q-Former its ViT's post-LayerNorm output: fovea's image_norm plays that part.
                out["image_norm." + key.rsplit(".", 1)[1]] = value
                continue
            if not key.startswith("qformer."):
                unknown.append(key)
                continue
            key = key[len("qformer."):]
        if key == "embeddings.position_ids":
            continue
        if (m := _LAYER.fullmatch(key)) is not None:
            rest = m.group(2)
            pair = next((p for p in _LAYER_NAMES if rest.startswith(p[0])), None)
            if pair is None:
                unknown.append(key)
            else:
                out[f"layers.{m.group(1)}.{pair[1]}{rest[len(pair[0]):]}"] = value
            continue
        pair = next((p for p in _TOP_NAMES if key.startswith(p[0])), None)
        if pair is None:
            unknown.append(key)
        else:
            out[pair[1] + key[len(pair[0]):]] = value
    if unknown:
        raise ValueError(f"Q-Former checkpoint keys fovea does not know: {sorted(unknown)[:8]}")
    return out


def _qformer_config(path: Path) -> tuple[dict[str, Any], dict[str, Any], bool]:
    config = read_config(path)
    kind = config.get("model_type")
    if kind in FULL_MODELS:
        return config, dict(config.get("qformer_config") or {}), True
    if kind in QFORMER_MODELS:
        return config, config, False
    raise ValueError(f"{str(path)!r} holds a {kind!r} checkpoint; a Q-Former loads from "
                     f"{list(FULL_MODELS + QFORMER_MODELS)}")


def load_qformer(path: str | Path, *, num_queries: int | None = None, out_dim: int | None = None) -> QFormer:
    """A fovea ``QFormer`` built from a BLIP-2 / InstructBLIP checkpoint directory's config and loaded with its
    weights. A whole model gives the query tokens, the Q-Former, the language projection (to its LLM's width)
    and its ViT's final LayerNorm (as ``image_norm``). A Q-Former-only directory has no query tokens and no
    projection: give ``num_queries`` and ``out_dim``; those parts start random and a warning says so."""
    path = Path(path)
    config, qcfg, full = _qformer_config(path)
    act, eps = qcfg.get("hidden_act", "gelu"), float(qcfg.get("layer_norm_eps", 1e-12))
    if act != "gelu" or abs(eps - 1e-12) > 1e-15:
        raise ValueError(f"Q-Former with activation {act!r} and layer_norm_eps {eps} is not supported "
                         "(BLIP-2's gelu and 1e-12)")
    dim = int(qcfg.get("hidden_size", 768))
    text_input = bool(qcfg.get("use_qformer_text_input", config.get("model_type", "").startswith("instructblip")))
    vision = dict(config.get("vision_config") or {}) if full else {}
    text = dict(config.get("text_config") or {}) if full else {}
    qformer = QFormer(
        in_channels=int(qcfg.get("encoder_hidden_size", 1408)),
        out_dim=out_dim or int(text.get("hidden_size", dim)),
        num_queries=num_queries or int(config.get("num_query_tokens", 32)),
        dim=dim, num_layers=int(qcfg.get("num_hidden_layers", 12)), heads=int(qcfg.get("num_attention_heads", 12)),
        cross_attention_every=int(qcfg.get("cross_attention_frequency", 2)), instruction_aware=text_input,
        position_encoding=False, image_norm=full, image_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        intermediate_size=int(qcfg.get("intermediate_size", 3072)),
        text_vocab_size=int(qcfg.get("vocab_size", 30522)) if text_input else 0,
        max_text_positions=int(qcfg.get("max_position_embeddings", 512)),
    )
    report = load_blip2_into(qformer, path)
    if report.fresh:
        warnings.warn(f"{str(path)!r} has no weights for {report.fresh}: they start random (train them, e.g. "
                      "`fovea train` stage align)", stacklevel=2)
    return qformer.eval()


def load_blip2_into(qformer: QFormer, path: str | Path, *, skip_mismatched: bool = False) -> LoadReport:
    """Copy a checkpoint's Q-Former weights into ``qformer``. Every checkpoint tensor must find its parameter;
    a shape that differs is an error unless ``skip_mismatched``."""
    path = Path(path)
    _, _, full = _qformer_config(path)
    state = qformer_state(read_state(path), full=full)
    own = qformer.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} has Q-Former weights this Q-Former lacks: {unexpected[:8]} "
                         "(instruction-aware checkpoints need instruction_aware=True and its vocabulary size)")
    report = LoadReport()
    mismatched = [k for k in state if state[k].shape != own[k].shape]
    if mismatched and not skip_mismatched:
        details = [f"{k}: checkpoint {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:6]]
        raise ValueError(f"checkpoint {str(path)!r} does not fit this Q-Former: {details}; pass "
                         "skip_mismatched=True to keep those tensors as they are")
    report.skipped = sorted(mismatched)
    keep = {k: v for k, v in state.items() if k not in mismatched}
    qformer.load_state_dict(keep, strict=False)
    report.loaded = sorted(keep)
    report.fresh = sorted(set(own) - set(keep) - set(mismatched))
    return report
