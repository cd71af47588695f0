"""The decoder LLM: transformers causal LMs from presets, local directories, or the converted SmolLM2."""

from fovea.lm.loader import LM_PRESETS, build_lm, fetch_smollm2, lm_from_config_dict, smollm2_dir
from fovea.lm.tokenizer import byte_tokenizer

__all__ = ["LM_PRESETS", "build_lm", "byte_tokenizer", "fetch_smollm2", "lm_from_config_dict", "smollm2_dir"]
