"""`fovea demo`: what a 2880x2160 contract page costs through three VLM layouts, on bundled defaults.

The vision and connector weights are random: the demo measures cost (tokens and time), not answer quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fovea.bench.common import describe, environment, setup_threads
from fovea.bench.stages import StageTimes, first_token
from fovea.config import CLIP_MEAN, CLIP_STD, ConnectorConfig, LMConfig, PreprocessConfig, VisionConfig, VLMConfig
from fovea.connectors import build_connector
from fovea.lm import build_lm, smollm2_dir
from fovea.model import VLM
from fovea.train.synth import render_contract
from fovea.vision import build_encoder


@dataclass
class DemoRow:
    layout: str  # human-readable pipeline name
    input_size: str  # encoder input in pixels, H x W
    times: StageTimes  # measured stage times and token counts
    encoder_shared: bool  # the encoder output was reused from the row above (same encoder, same image)


LAYOUTS = [
    # (label, encoder, connector, budget)
    ("ViT-L/14 AnyRes + MLP (LLaVA-NeXT)", "vit-l14-336-anyres", "mlp", 0),
    ("FastViTHD + MLP (FastVLM)", "fastvithd", "mlp", 0),
    ("FastViTHD + Perceiver, 256 tokens", "fastvithd", "perceiver", 256),
    ("FastViTHD + Q-Former, 64 tokens", "fastvithd", "qformer", 64),
]


def run_demo(
    *, max_side: int = 1536, llm: str = "auto", threads: int | None = None, seed: int = 0,
    progress: Callable[[str], None] = print,
) -> tuple[list[DemoRow], dict]:
    """Render the page, then for each layout time preprocess / encode / compress / prefill to the first token."""
    setup_threads(threads)
    env = environment()
    torch.manual_seed(seed)
    if llm == "auto":
        llm = "smollm2" if (smollm2_dir() / "config.json").is_file() else "smollm2-135m-shape"
    progress(f"[demo] {describe(env)}")
    progress("[demo] rendering a 2880x2160 contract page ...")
    page = render_contract(2880, 2160, seed=seed).image
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is the agreement number?"}]}]
    progress(f"[demo] loading the LLM {llm!r} ...")
    lm, tokenizer = build_lm(LMConfig(name=llm))
    lm.eval()
    rows: list[DemoRow] = []
    encoders: dict[str, torch.nn.Module] = {}
    cached: dict[str, list[torch.Tensor]] = {}
    for i, (label, enc_name, con_name, budget) in enumerate(LAYOUTS, start=1):
        progress(f"[demo] {i}/{len(LAYOUTS)} {label}: building ...")
        config = VLMConfig(
            vision=VisionConfig(name=enc_name),
            connector=ConnectorConfig(name=con_name, num_queries=budget or 256),
            lm=LMConfig(name=llm),
            preprocess=PreprocessConfig(max_side=max_side, upscale=True, mean=CLIP_MEAN, std=CLIP_STD),
        )
        if enc_name not in encoders:
            encoders[enc_name] = build_encoder(config.vision).eval()
        encoder = encoders[enc_name]
        connector = build_connector(config.connector, in_channels=encoder.channels, out_dim=lm.config.hidden_size)
        if config.image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]},
                                         replace_extra_special_tokens=False)
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = VLM(config, encoder=encoder, connector=connector.eval(), lm=lm, tokenizer=tokenizer).eval()
        progress(f"[demo] {i}/{len(LAYOUTS)} {label}: running to the first token ...")
        start = time.perf_counter()
        shared = enc_name in cached
        times, _, feats = first_token(model, messages, [page], features=cached.get(enc_name))
        if shared:
            times.encode_ms = rows[-1].times.encode_ms
        cached[enc_name] = feats
        size = model.processor().image_processor(page).pixels.shape[-2:]
        rows.append(DemoRow(label, f"{size[0]}x{size[1]}", times, shared))
        progress(f"[demo] {i}/{len(LAYOUTS)} done in {time.perf_counter() - start:.1f} s")
    return rows, {"env": env, "llm": llm, "max_side": max_side}


def format_table(rows: list[DemoRow], meta: dict) -> str:
    head = (f"{'layout':<38} {'input':>10} {'vis.tok':>8} {'prompt':>7} {'encode':>9} {'compress':>9} "
            f"{'prefill':>9} {'TTFT':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r.times
        enc = f"{t.encode_ms / 1e3:.2f} s" + ("*" if r.encoder_shared else "")
        lines.append(
            f"{r.layout:<38} {r.input_size:>10} {t.visual_tokens:>8,} {t.prompt_tokens:>7,} {enc:>9} "
            f"{t.compress_ms / 1e3:>7.2f} s {t.prefill_ms / 1e3:>7.2f} s {t.ttft_ms / 1e3:>7.2f} s"
        )
    lines.append("")
    lines.append("* encoder output shared with the row above (same encoder, same image); its time is counted in TTFT.")
    lines.append(f"LLM: {meta['llm']}. Encoder and connector weights are random: this measures cost, not answers.")
    lines.append(f"{describe(meta['env'])}; one run each, no warm-up (see `fovea bench ttft` for medians).")
    return "\n".join(lines)
