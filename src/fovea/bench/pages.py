"""`fovea bench pages`: time to first token for 1-, 4- and 16-page PDFs, a fixed budget per page (the Q-Former's 64
tokens) against the 1:1 layout (FastViTHD + MLP, FastVLM's), in one run.

Each document is a real PDF (the synthetic contract pages, rendered by pypdfium2 at the encoder's side) asked one
question through fovea's engine with both caches off, so every page is encoded and every token prefilled: the
engine's own per-request metrics are the measurement. Vision and connector weights are random; cost does not
depend on their values.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fovea.bench.common import describe, environment, save_results
from fovea.bench.ttft import Layout, build_layout_model, resolve_llm
from fovea.config import LMConfig, VisionConfig
from fovea.data.synth import render_contract
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.lm import build_lm
from fovea.log import say
from fovea.plotting import pyplot, save_figure
from fovea.preprocess.document import document_messages, open_document
from fovea.runtime import dtype_name, placement

QUESTION = "What is the agreement number?"


def contract_pdf(pages: int, size: tuple[int, int] = (2880, 2160)) -> bytes:
    """``pages`` different contract pages (seeds 0..pages-1) as one PDF, each page image at 300 DPI."""
    images = [render_contract(*size, seed=i).image for i in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:], resolution=300.0)
    return buf.getvalue()


def run_pages_bench(*, pages: tuple[int, ...] = (1, 4, 16), llm: str = "smollm2", max_side: int = 1024,
                    budget: int = 64, threads: int | None = None, device: str = "auto", dtype: str = "auto",
                    page_size: tuple[int, int] = (2880, 2160), vision: VisionConfig | None = None,
                    out_dir: str | Path = "bench-results", progress: Callable[[str], None] = say) -> dict[str, Any]:
    """``vision``: the encoder (default FastViTHD); ``page_size``: the rendered contract pages' WxH."""
    place = placement(device, dtype, threads)
    env = environment()
    fast = vision or VisionConfig(name="fastvithd")
    layouts = [Layout("FastViTHD + MLP, 1:1 (FastVLM)", fast, "mlp", max_side=max_side),
               Layout(f"FastViTHD + Q-Former, {budget} per page", fast, "qformer", budget, max_side=max_side)]
    preset, label = resolve_llm(llm)
    progress(f"[bench pages] {describe(env)}; {place.describe()}; LLM {label}")
    torch.manual_seed(0)
    lm, tokenizer = build_lm(LMConfig(name=preset))
    lm.eval().to(place.device, place.dtype)
    encoders: dict[str, Any] = {}
    models = [build_layout_model(layout, lm, tokenizer, encoders).place(place.device, place.dtype)
              for layout in layouts]
    context = getattr(lm.config, "max_position_embeddings", 8192)
    rows = []
    for n in pages:
        progress(f"[bench pages] rendering a {n}-page PDF ...")
        document = open_document(contract_pdf(n, page_size), max_pages=max(pages), target_side=max_side)
        for layout, model in zip(layouts, models, strict=True):
            row = _measure(model, layout.label, document, context)
            rows.append(row)
            progress(f"[bench pages] {n:>2} pages, {layout.label}: {row['prompt_tokens']:,} prompt tokens, "
                     + (f"TTFT {row['ttft_s']:.2f} s (encode {row['encode_s']:.2f} s, prefill {row['prefill_s']:.2f} "
                        "s)" if "ttft_s" in row else row["skipped"]))
    payload = {"benchmark": "pages", "env": env, "llm": label, "max_side": max_side, "budget": budget,
               "dtype": dtype_name(place.dtype), "device": str(place.device), "rows": rows,
               "command": f"fovea bench pages --pages {','.join(map(str, pages))} --max-side {max_side} --llm {llm}"}
    return save_results(payload, out_dir, "pages", chart, progress)


@torch.inference_mode()
def _measure(model, label: str, document, context: int) -> dict[str, Any]:
    engine = Engine(model, EngineConfig(max_batch=1, max_len=context, step_tokens=context, encoder_cache=0,
                                        prefix_cache=0))
    engine.eos_ids = set()
    row: dict[str, Any] = {"layout": label, "pages": len(document.pages)}
    messages = document_messages(document, QUESTION)
    tokens = sum(model.num_visual_tokens(*model.processor().image_processor(p).pixels.shape[-2:])
                 for p in document.pages)
    if tokens + 64 > context:
        row.update(prompt_tokens=tokens, skipped=f"{tokens:,} visual tokens exceed the LLM's {context:,} positions")
        return row
    start = time.perf_counter()
    request = engine.add_request(messages, document.pages, SamplingParams(max_tokens=1))
    engine.run_until_done()
    m = request.metrics
    row.update(prompt_tokens=m.prompt_tokens, visual_tokens=m.visual_tokens, ttft_s=m.ttft_ms / 1e3,
               encode_s=m.encode_ms / 1e3, compress_s=m.compress_ms / 1e3, prefill_s=m.prefill_ms / 1e3,
               preprocess_s=m.preprocess_ms / 1e3, wall_s=time.perf_counter() - start)
    return row


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["layout"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["layout"] == label and "ttft_s" in r]
        ax1.plot([r["pages"] for r in rows], [r["ttft_s"] for r in rows], marker="o", label=label)
        ax2.plot([r["pages"] for r in rows], [r["prompt_tokens"] for r in rows], marker="o", label=label)
    ax1.set(xlabel="pages in the PDF", ylabel="TTFT (s)", title="time to first token per document")
    ax2.set(xlabel="pages in the PDF", ylabel="prompt tokens", title="tokens the LLM reads")
    ax1.legend()
    save_figure(fig, path)


def format_table(payload: dict[str, Any]) -> str:
    head = f"{'pages':>5} {'layout':<34} {'prompt':>7} {'encode':>9} {'prefill':>9} {'TTFT':>9}"
    lines = [head, "-" * len(head)]
    for r in payload["rows"]:
        if "ttft_s" not in r:
            lines.append(f"{r['pages']:>5} {r['layout']:<34} {r['prompt_tokens']:>7,} {r['skipped']}")
            continue
        lines.append(f"{r['pages']:>5} {r['layout']:<34} {r['prompt_tokens']:>7,} {r['encode_s']:>7.2f} s "
                     f"{r['prefill_s']:>7.2f} s {r['ttft_s']:>7.2f} s")
    lines.append(f"LLM {payload['llm']}, max side {payload['max_side']}, {payload['dtype']} on {payload['device']}; "
                 "caches off, one run each.")
    return "\n".join(lines)
