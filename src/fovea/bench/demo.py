"""`fovea demo`: what a 2880x2160 contract page costs through four VLM layouts, on bundled defaults.

The vision and connector weights are random: the demo measures cost (tokens and time), not answer quality.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fovea.bench.common import describe, environment
from fovea.bench.stages import StageTimes, first_token
from fovea.bench.ttft import Layout, build_layout_model
from fovea.config import LMConfig, VisionConfig
from fovea.data.synth import render_contract
from fovea.lm import build_lm
from fovea.loading import default_llm
from fovea.log import say
from fovea.runtime import placement


@dataclass
class DemoRow:
    layout: str  # human-readable pipeline name
    input_size: str  # encoder input in pixels, W x H
    times: StageTimes  # measured stage times and token counts
    encoder_shared: bool  # the encoder output was reused from the row above (same encoder, same image)


def demo_layouts(max_side: int) -> list[Layout]:
    fast = VisionConfig(name="fastvithd")
    return [
        Layout("ViT-L/14 AnyRes + MLP (LLaVA-NeXT)", VisionConfig(name="vit-l14-336-anyres"), "llava_next"),
        Layout("FastViTHD + MLP (FastVLM)", fast, "mlp", max_side=max_side),
        Layout("FastViTHD + Perceiver, 256 tokens", fast, "perceiver", 256, max_side=max_side),
        Layout("FastViTHD + Q-Former, 64 tokens", fast, "qformer", 64, max_side=max_side),
    ]


def run_demo(
    *, max_side: int = 1536, llm: str = "auto", threads: int | None = None, seed: int = 0,
    device: str = "auto", dtype: str = "auto", progress: Callable[[str], None] = say,
) -> tuple[list[DemoRow], dict]:
    """Render the page, then for each layout time preprocess / encode / compress / prefill to the first token."""
    place = placement(device, dtype, threads)
    env = environment()
    torch.manual_seed(seed)
    if llm == "auto":
        llm = default_llm()
    progress(f"[demo] {describe(env)}; {place.describe()}")
    progress("[demo] rendering a 2880x2160 contract page ...")
    page = render_contract(2880, 2160, seed=seed).image
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is the agreement number?"}]}]
    progress(f"[demo] loading the LLM {llm!r} ...")
    lm, tokenizer = build_lm(LMConfig(name=llm))
    lm.eval().to(place.device, place.dtype)
    rows: list[DemoRow] = []
    encoders: dict[str, torch.nn.Module] = {}
    cached: dict[str, list[torch.Tensor]] = {}
    layouts = demo_layouts(max_side)
    for i, layout in enumerate(layouts, start=1):
        progress(f"[demo] {i}/{len(layouts)} {layout.label}: building ...")
        key = repr(layout.vision)
        model = build_layout_model(layout, lm, tokenizer, encoders).place(place.device, place.dtype)
        progress(f"[demo] {i}/{len(layouts)} {layout.label}: running to the first token ...")
        start = time.perf_counter()
        shared = key in cached
        times, _, feats = first_token(model, messages, [page], features=cached.get(key))
        if shared:
            times.encode_ms = rows[-1].times.encode_ms
        cached[key] = feats
        size = model.processor().image_processor(page).pixels.shape[-2:]
        rows.append(DemoRow(layout.label, f"{size[1]}x{size[0]}", times, shared))  # WxH, as everywhere
        progress(f"[demo] {i}/{len(layouts)} done in {time.perf_counter() - start:.1f} s")
    return rows, {"env": env, "llm": llm, "max_side": max_side, "placement": place.describe()}


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
