"""`fovea demo`: the bundled document reader answers questions about 2880x2160 pages it has never seen, then
what one page costs through the reader and four other VLM layouts.

The reader (``document-reader``) is trained; the other layouts' vision and connector weights are random: their
rows measure cost (tokens and time), not answers.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fovea.bench.common import describe, environment
from fovea.bench.stages import StageTimes, first_token
from fovea.bench.ttft import Layout, build_layout_model
from fovea.config import LMConfig, VisionConfig
from fovea.data.documents import pick_questions, render_document
from fovea.data.synth import render_contract
from fovea.lm import build_lm
from fovea.loading import BUNDLED_MODELS, bundle_installed, default_llm, load_vlm
from fovea.log import say
from fovea.runtime import placement


@dataclass
class DemoRow:
    layout: str  # human-readable pipeline name
    input_size: str  # encoder input in pixels, W x H
    times: StageTimes  # measured stage times and token counts
    encoder_shared: bool  # the encoder output was reused from the row above (same encoder, same image)


@dataclass
class DemoAnswer:
    kind: str  # the document kind
    question: str  # asked in a wording training never used
    answer: str  # the reader's answer
    reference: str  # the text on the page (or the refusal, when the page does not answer)
    right: bool  # normalised exact match, as `fovea eval` counts it


# Held-out pages: the held-out split's label and question wordings, font family and field layout, and seeds that
# training data (drawn from seeds 10 and 12 through a random stream) does not use.
DEMO_PAGES = (("invoice", 101), ("lease", 202), ("statement", 303))
READER = "document-reader"


def read_pages(model, *, questions: int = 3, progress: Callable[[str], None] = say) -> list[DemoAnswer]:
    """Ask the reader ``questions`` questions about each of ``DEMO_PAGES`` (2880x2160, scan damage)."""
    from fovea.engine import Engine, EngineConfig, SamplingParams
    from fovea.eval.qa import normalise

    asked = []
    for kind, seed in DEMO_PAGES:
        doc = render_document(kind, seed, size=(2880, 2160), split="heldout")
        for fact in pick_questions(doc, questions, random.Random(seed)):
            asked.append((doc, fact))
    progress(f"[demo] the document reader: {len(asked)} questions about {len(DEMO_PAGES)} held-out pages ...")
    engine = Engine(model, EngineConfig(max_batch=8, max_len=4096))
    requests = [([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": fact.question}]}],
                 [doc.image], SamplingParams(max_tokens=32)) for doc, fact in asked]
    results = engine.generate(requests)
    return [DemoAnswer(doc.kind, fact.question, res["text"].strip(), fact.answer,
                       normalise(res["text"]) == normalise(fact.answer))
            for (doc, fact), res in zip(asked, results, strict=True)]


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
    device: str = "auto", dtype: str = "auto", progress: Callable[[str], None] = say, reader: bool = True,
) -> tuple[list[DemoRow], dict]:
    """The bundled reader's answers (``reader``), then for the reader and each layout the time of preprocess /
    encode / compress / prefill to the first token on one rendered contract page."""
    place = placement(device, dtype, threads)
    env = environment()
    torch.manual_seed(seed)
    if llm == "auto":
        llm = default_llm()
    progress(f"[demo] {describe(env)}; {place.describe()}")
    progress(f"[demo] loading the LLM {llm!r} for the layouts ...")  # first: a bad --llm fails before anything runs
    lm, tokenizer = build_lm(LMConfig(name=llm))
    lm.eval().to(place.device, place.dtype)
    answers: list[DemoAnswer] = []
    reader_model = None
    if reader and not bundle_installed(READER):
        progress(f"[demo] fovea's document reader is not trained yet (no bundle at {BUNDLED_MODELS[READER]}; "
                 "docs/document-reader.md): the layouts' costs only")
        reader = False
    if reader:
        reader_model = load_vlm(READER, progress=progress, device=device, dtype=dtype, threads=threads)
        answers = read_pages(reader_model, progress=progress)
    progress("[demo] rendering a 2880x2160 contract page ...")
    page = render_contract(2880, 2160, seed=seed).image
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is the agreement number?"}]}]
    rows: list[DemoRow] = []
    if reader_model is not None:
        progress("[demo] the document reader: running to the first token ...")
        times, _, _ = first_token(reader_model, messages, [page])
        size = reader_model.processor().image_processor(page).pixels.shape[-2:]
        rows.append(DemoRow("fovea document reader (trained)", f"{size[1]}x{size[0]}", times, False))
        del reader_model
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
    return rows, {"env": env, "llm": llm, "max_side": max_side, "placement": place.describe(), "answers": answers}


def format_answers(answers: list[DemoAnswer]) -> str:
    if not answers:
        return ""
    lines = [f"The bundled document reader on {len(DEMO_PAGES)} held-out 2880x2160 pages (wordings, font and "
             "layout it was not trained on):", ""]
    for a in answers:
        mark = "right" if a.right else f"wrong, the page says {a.reference!r}"
        lines.append(f"  [{a.kind}] {a.question}\n      -> {a.answer!r} ({mark})")
    lines.append(f"\n{sum(a.right for a in answers)} of {len(answers)} right (normalised exact match).\n")
    return "\n".join(lines)


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
    trained = any(r.layout.startswith("fovea document reader") for r in rows)
    lines.append(f"LLM: {meta['llm']}. " + ("Except the document reader's, these rows' " if trained else "The ")
                 + "encoder and connector weights are random: they measure cost, not answers.")
    lines.append(f"{describe(meta['env'])}; one run each, no warm-up (see `fovea bench ttft` for medians).")
    return "\n".join(lines)
