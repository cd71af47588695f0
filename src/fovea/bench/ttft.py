"""`fovea bench ttft`: time to first token on a 2880x2160 page, split into preprocess / encode / compress /
prefill, for LLaVA-NeXT-, FastVLM- and compressor-style layouts, beside transformers' own FastVLM and LLaVA-NeXT
built with the same shapes (FastVLM: the same weights too) in the same run.

Vision, connector and (for shape presets) LLM weights are random: cost does not depend on their values. Each stage
is timed on its own (warm-up, repeats, median); a layout's TTFT is the sum of its stage medians. An encoder's output
is shared by the layouts that use the same encoder on the same page. The transformers peers are timed end to end
with ``generate(max_new_tokens=1)``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fovea.bench.common import (
    count_flops,
    describe,
    environment,
    matmul_gflops,
    save_results,
    sync,
    time_adaptive,
)
from fovea.config import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_NEXT_PINPOINTS,
    ConnectorConfig,
    LMConfig,
    PreprocessConfig,
    VisionConfig,
    VLMConfig,
)
from fovea.connectors import build_connector
from fovea.data.synth import render_contract
from fovea.lm import build_lm, smollm2_dir
from fovea.log import say
from fovea.model import VLM, add_image_token
from fovea.plotting import pyplot, save_figure
from fovea.preprocess import grid_pinpoints
from fovea.runtime import dtype_name, placement
from fovea.vision import build_encoder

QUESTION = "What is the agreement number?"


@dataclass
class Layout:
    label: str  # row name
    vision: VisionConfig  # encoder
    connector: str  # connector registry key
    budget: int = 0  # token budget for compressors (0 for 1:1 connectors)
    max_side: int = 1536  # long side the page is resized to for this encoder
    tags: list[str] = field(default_factory=list)  # "vit", "fastvlm", "compressor" (used for the bars)


def default_layouts(quick: bool, max_side: int) -> list[Layout]:
    std = VisionConfig(name="vit-l14-336-anyres", pinpoints=LLAVA_NEXT_PINPOINTS)
    wide = VisionConfig(name="vit-l14-336-anyres", pinpoints=grid_pinpoints(336, 4))
    fast = VisionConfig(name="fastvithd")
    layouts = [
        Layout("ViT-L/14 AnyRes (LLaVA-NeXT grid) + MLP", std, "llava_next", tags=["vit"]),
        Layout("FastViTHD + MLP (FastVLM)", fast, "mlp", max_side=max_side, tags=["fastvlm"]),
    ]
    if not quick:
        layouts.insert(1, Layout("ViT-L/14 AnyRes (4x4 grid) + MLP", wide, "llava_next", tags=["vit"]))
    budgets = (64, 256) if quick else (64, 128, 256)
    connectors = ("perceiver", "qformer") if quick else ("perceiver", "qformer", "c_abstractor", "avgpool")
    for name in connectors:
        for q in budgets:
            layouts.append(Layout(f"FastViTHD + {name} {q}", fast, name, q, max_side, tags=["compressor"]))
    return layouts


def resolve_llm(name: str) -> tuple[str, str]:
    """(preset to build, label): 'smollm2' falls back to its random same-shape preset when not fetched."""
    if name == "smollm2" and not (smollm2_dir() / "config.json").is_file():
        return "smollm2-135m-shape", "smollm2-135m-shape (random; run `fovea fetch-llm smollm2` for real weights)"
    return name, name


def build_layout_model(layout: Layout, lm, tokenizer, encoders: dict) -> VLM:
    """A VLM for ``layout`` around a shared LLM; encoders are built once per vision config (fused) and reused."""
    config = VLMConfig(
        vision=copy.deepcopy(layout.vision),
        connector=ConnectorConfig(name=layout.connector, num_queries=layout.budget or 256),
        preprocess=PreprocessConfig(max_side=layout.max_side, upscale=True, mean=CLIP_MEAN, std=CLIP_STD),
    )
    key = repr(layout.vision)
    if key not in encoders:
        encoder = build_encoder(layout.vision).eval()
        encoders[key] = (encoder, encoder.reparameterize())  # the fused encoder and the overrides that rebuild it
    encoder, fused = encoders[key]
    add_image_token(lm, tokenizer, config.image_token)
    connector = build_connector(config.connector, in_channels=encoder.channels, out_dim=lm.config.hidden_size)
    model = VLM(config, encoder=encoder, connector=connector.eval(), lm=lm, tokenizer=tokenizer).eval()
    model.config.vision.overrides.update(fused)
    return model


def layout_flops(model: VLM, page) -> float:
    """FLOPs of one request to its first token (encode, compress, prefill), counted by torch, not timed."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = model.processor()(messages, [page])

    def run():
        visual = model.visual_tokens([img.pixels for img in prompt.images],
                                     image_sizes=[img.original_size for img in prompt.images])
        model.lm(inputs_embeds=model.embed(prompt.input_ids[None].to(model.device), visual), use_cache=True,
                 logits_to_keep=1)

    # FlopCounterMode hooks every tensor that requires grad; under no_grad those have no graph and it fails.
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.requires_grad_(False)
        with torch.no_grad():
            return count_flops(run)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def measure_layout(model: VLM, page, *, features_cache: dict, warmup: int, repeats: int, budget_s: float,
                   cache_key: str) -> tuple[dict[str, Any], int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    processor = model.processor()
    kw = dict(warmup=warmup, repeats=repeats, budget_s=budget_s)
    pre = time_adaptive(lambda: processor(messages, [page]), **kw)
    prompt = processor(messages, [page])
    pixels = [img.pixels for img in prompt.images]
    if cache_key not in features_cache:
        box: dict[str, Any] = {}

        def encode():
            box["f"] = model.encode(pixels)

        features_cache[cache_key] = (time_adaptive(encode, **kw), box["f"])
    enc, feats = features_cache[cache_key]
    sizes = [img.original_size for img in prompt.images]
    comp = time_adaptive(lambda: model.image_tokens(pixels, image_sizes=sizes, features=feats), **kw)
    visual = torch.cat(model.image_tokens(pixels, image_sizes=sizes, features=feats))
    ids = prompt.input_ids[None].to(model.device)
    token_box: dict[str, int] = {}

    def prefill():
        out = model.lm(inputs_embeds=model.embed(ids, visual), use_cache=True, logits_to_keep=1)
        token_box["t"] = int(out.logits[0, -1].argmax())

    pf = time_adaptive(prefill, **kw)
    stages = {"preprocess": pre, "encode": enc, "compress": comp, "prefill": pf}
    row = {
        "visual_tokens": sum(prompt.num_visual_tokens), "prompt_tokens": int(ids.shape[1]),
        "input": "x".join(str(s) for s in reversed(pixels[0].shape[-2:])),  # WxH
        **{f"{k}_s": v.median_s for k, v in stages.items()},
        "stage_timings": {k: v.to_dict() for k, v in stages.items()},
        "ttft_s": sum(v.median_s for v in stages.values()),
    }
    return row, token_box["t"]


def measure_fastvlm_peer(model: VLM, page, *, warmup: int, repeats: int, budget_s: float) -> tuple[dict, int]:
    """transformers FastVLM with the same weights, on the same pixels and ids, to its first generated token; and
    fovea's same model timed the same way (end to end, nothing cached), alternating, so the two are comparable."""
    from fovea.bench.stages import first_token
    from fovea.interop.fastvlm import fastvlm_peer

    # The peer runs where fovea runs, in fovea's dtype: a fair pair (transformers casts every weight).
    peer = fastvlm_peer(model).to(model.device, next(model.lm.parameters()).dtype)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    processor = model.processor()
    box: dict[str, int] = {}

    def run_peer():
        prompt = processor(messages, [page])  # same preprocessing, counted in the peer's time too
        ids = prompt.input_ids[None].to(model.device)
        out = peer.generate(input_ids=ids, pixel_values=prompt.images[0].pixels[None].to(model.device, peer.dtype),
                            attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        box["t"] = int(out[0, -1])

    def run_fovea():
        box["f"] = first_token(model, messages, [page])[1]

    timings = {"transformers": [], "fovea": []}
    for i in range(max(1, repeats)):  # alternate, so drifting machine load hits both alike
        w = warmup if i == 0 else 0
        timings["transformers"].append(time_adaptive(run_peer, warmup=w, repeats=1, budget_s=budget_s).median_s)
        timings["fovea"].append(time_adaptive(run_fovea, warmup=w, repeats=1, budget_s=budget_s).median_s)
    hf, fv = timings["transformers"], timings["fovea"]
    row = {"ttft_s": statistics.median(hf), "min_s": min(hf), "max_s": max(hf), "runs": len(hf),
           "fovea_end_to_end_s": statistics.median(fv), "fovea_min_s": min(fv), "fovea_max_s": max(fv)}
    return row, box["t"]


CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14)


def measure_llava_next_peer(lm, tokenizer, page, pinpoints, *, warmup: int, repeats: int, budget_s: float,
                            vision_shape: dict | None = None) -> dict[str, Any]:
    """transformers LLaVA-NeXT with CLIP ViT-L/14-336 shapes and ``lm``'s shapes (random vision/projector weights,
    ``lm``'s weights), its own image processor and processor, to the first generated token."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    image_token = "<image>"
    shape = vision_shape or CLIP_L14_336
    tile, patch = shape["image_size"], shape["patch_size"]
    vision = CLIPVisionConfig(**shape, hidden_act="quick_gelu")
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=lm.config.to_dict(),
                             image_token_index=tokenizer.convert_tokens_to_ids(image_token),
                             image_grid_pinpoints=[list(p) for p in pinpoints], vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             tie_word_embeddings=bool(lm.config.tie_word_embeddings))
    peer = LlavaNextForConditionalGeneration(config).eval()
    peer.model.language_model.load_state_dict(lm.model.state_dict())
    peer.lm_head.load_state_dict(lm.lm_head.state_dict())
    weights = next(lm.parameters())
    peer.to(weights.device, weights.dtype)  # fovea's placement: the same device and dtype
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints],
                                              size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", image_token=image_token,
                                   num_additional_image_tokens=1)
    text = tokenizer.apply_chat_template([{"role": "user", "content": image_token + QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    box: dict[str, int] = {}

    def run():
        inputs = processor(images=page, text=text, return_tensors="pt").to(weights.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(weights.dtype)
        peer.generate(**inputs, max_new_tokens=1, do_sample=False)
        box["tokens"] = int(inputs["input_ids"].shape[1])

    timing = time_adaptive(run, warmup=warmup, repeats=repeats, budget_s=budget_s)
    return {**timing.to_dict(), "ttft_s": timing.median_s, "prompt_tokens": box["tokens"]}


def _llm_rows(label: str, lm, tokenizer, layouts: list[Layout], page, place, rate: float, encoders: dict,
              features_cache: dict, *, peers: bool, warmup: int, repeats: int, budget_s: float,
              llava_vision: dict | None, llava_pinpoints, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every layout around one LLM, each followed by its transformers peer where it has one."""
    rows = []
    for i, layout in enumerate(layouts, start=1):
        progress(f"[bench ttft] {label}: {i}/{len(layouts)} {layout.label} ...")
        model = build_layout_model(layout, lm, tokenizer, encoders).place(place.device, place.dtype)
        start = time.perf_counter()
        with torch.inference_mode():
            row, token = measure_layout(model, page, features_cache=features_cache, warmup=warmup, repeats=repeats,
                                        budget_s=budget_s, cache_key=f"{layout.vision!r}@{layout.max_side}")
        row["limit_s"] = layout_flops(model, page) / 1e9 / rate
        sync()
        row.update(layout=layout.label, tags=layout.tags, x_limit=row["ttft_s"] / row["limit_s"])
        rows.append(row)
        progress(f"[bench ttft]   {row['visual_tokens']:,} visual tokens, TTFT {row['ttft_s']:.2f} s "
                 f"(encode {row['encode_s']:.2f}, prefill {row['prefill_s']:.2f}) in "
                 f"{time.perf_counter() - start:.0f} s")
        if peers and "fastvlm" in layout.tags:
            progress(f"[bench ttft] {label}: transformers FastVLM, same shapes and weights ...")
            with torch.inference_mode():
                peer, peer_token = measure_fastvlm_peer(model, page, warmup=warmup, repeats=repeats,
                                                        budget_s=budget_s)
            peer.update(layout="transformers FastVlmForConditionalGeneration", tags=["peer-fastvlm"],
                        same_first_token=peer_token == token)
            rows.append(peer)
            progress(f"[bench ttft]   TTFT {peer['ttft_s']:.2f} s vs fovea end to end "
                     f"{peer['fovea_end_to_end_s']:.2f} s; same first token: {peer['same_first_token']}")
    if peers and any("vit" in layout.tags for layout in layouts):
        progress(f"[bench ttft] {label}: transformers LLaVA-NeXT (LLaVA-NeXT grid), same shapes ...")
        with torch.inference_mode():
            peer = measure_llava_next_peer(lm, tokenizer, page, llava_pinpoints, warmup=warmup, repeats=repeats,
                                           budget_s=budget_s, vision_shape=llava_vision)
        peer.update(layout="transformers LlavaNextForConditionalGeneration", tags=["peer-llava-next"])
        rows.append(peer)
        progress(f"[bench ttft]   TTFT {peer['ttft_s']:.2f} s ({peer['prompt_tokens']:,} prompt tokens)")
    return rows


def _model_row(spec: str, page, rate: float, *, device: str, dtype: str, threads: int | None, warmup: int,
               repeats: int, budget_s: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """One trained model's stages to the first token and its FLOP limit."""
    from fovea.loading import load_vlm

    progress(f"[bench ttft] {spec}: loading ...")
    model = load_vlm(spec, progress=progress, device=device, dtype=dtype, threads=threads)
    with torch.inference_mode():
        row, _ = measure_layout(model, page, features_cache={}, warmup=warmup, repeats=repeats, budget_s=budget_s,
                                cache_key=spec)
    row["limit_s"] = layout_flops(model, page) / 1e9 / rate
    row.update(layout=spec, tags=["model"], x_limit=row["ttft_s"] / row["limit_s"])
    progress(f"[bench ttft]   TTFT {row['ttft_s']:.2f} s, {row['x_limit']:.1f}x its FLOP limit {row['limit_s']:.2f} s")
    return row


def run_ttft_bench(*, llms: list[str] | None = None, quick: bool = False, max_side: int = 1536,
                   threads: int | None = None, warmup: int = 1, repeats: int = 3, budget_s: float = 90.0,
                   peers: bool = True, layouts: list[Layout] | None = None, out_dir: str | Path = "bench-results",
                   page_size: tuple[int, int] = (2880, 2160), llava_vision: dict | None = None,
                   llava_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS, only: str | None = None,
                   device: str = "auto", dtype: str = "auto", model: str | None = None,
                   progress: Callable[[str], None] = say) -> dict[str, Any]:
    """``model``: time that one model (a bundled model such as ``document-reader``, a directory or a preset) instead
    of the layouts."""
    place = placement(device, dtype, threads)
    rate = matmul_gflops(place.dtype, place.device)
    env = environment()
    llms = llms or (["smollm2"] if quick else ["qwen2-0.5b-shape", "smollm2"])
    layouts = layouts or default_layouts(quick, max_side)
    if only:  # e.g. only="MLP (FastVLM)": just that layout and its transformers peer
        layouts = [layout for layout in layouts if only in layout.label]
        if not layouts:
            raise ValueError(f"--only {only!r} matches no layout")
    progress(f"[bench ttft] {describe(env)}; {place.describe()}; matmul {rate:,.0f} GFLOP/s; random vision/connector "
             "weights")
    progress(f"[bench ttft] rendering the {page_size[0]}x{page_size[1]} contract page ...")
    page = render_contract(*page_size, seed=0).image
    results: dict[str, Any] = {}
    encoders: dict[str, Any] = {}
    features_cache: dict[str, Any] = {}
    if model is not None:
        llms = []
        results[model] = {"rows": [_model_row(model, page, rate, device=device, dtype=dtype, threads=threads,
                                              warmup=warmup, repeats=repeats, budget_s=budget_s, progress=progress)],
                          "claims": {}}
    for llm_name in llms:
        preset, label = resolve_llm(llm_name)
        progress(f"[bench ttft] LLM {label}: loading ...")
        torch.manual_seed(0)
        lm, tokenizer = build_lm(LMConfig(name=preset))
        lm.eval().to(place.device, place.dtype)
        rows = _llm_rows(label, lm, tokenizer, layouts, page, place, rate, encoders, features_cache, peers=peers,
                         warmup=warmup, repeats=repeats, budget_s=budget_s, llava_vision=llava_vision,
                         llava_pinpoints=llava_pinpoints, progress=progress)
        results[label] = {"rows": rows, "claims": claims(rows)}
        del lm
    payload = {"benchmark": "ttft", "env": env, "quick": quick, "max_side": max_side, "results": results,
               "page": f"{page_size[0]}x{page_size[1]}", "dtype": dtype_name(place.dtype),
               "device": str(place.device), "matmul_gflops": rate,
               "command": "fovea bench ttft" + (" --quick" if quick else "") + (f" --only {only!r}" if only else "")
               + (f" --model {model}" if model else "")}
    return save_results(payload, out_dir, "ttft", chart, progress)


def claims(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seed claims, as ratios measured in this run."""
    by = {r["layout"]: r for r in rows}
    out: dict[str, Any] = {}
    vit = [r for r in rows if "vit" in r.get("tags", [])]
    best256 = [r for r in rows if "compressor" in r.get("tags", []) and r["layout"].endswith(" 256")]
    if vit and best256:
        fastest = min(best256, key=lambda c: c["ttft_s"])
        for r in vit:
            out[f"TTFT {r['layout']} / {fastest['layout']}"] = r["ttft_s"] / fastest["ttft_s"]
    fast = by.get("FastViTHD + MLP (FastVLM)")
    peer = by.get("transformers FastVlmForConditionalGeneration")
    if fast and peer:
        out["TTFT transformers FastVLM / fovea FastViTHD + MLP (both end to end)"] = (
            peer["ttft_s"] / peer["fovea_end_to_end_s"])
        out["same first token as transformers FastVLM"] = peer.get("same_first_token")
    return out


def format_table(payload: dict[str, Any]) -> str:
    lines = []
    for llm, result in payload["results"].items():
        lines.append(f"LLM: {llm}")
        head = (f"  {'layout':<46} {'vis.tok':>7} {'prompt':>7} {'preproc':>8} {'encode':>8} {'compress':>8} "
                f"{'prefill':>8} {'TTFT':>8} {'limit':>7} {'x limit':>7}")
        lines += [head, "  " + "-" * (len(head) - 2)]
        for r in result["rows"]:
            if "encode_s" in r:
                lines.append(f"  {r['layout']:<46} {r['visual_tokens']:>7,} {r['prompt_tokens']:>7,} "
                             f"{r['preprocess_s']:>7.2f}s {r['encode_s']:>7.2f}s {r['compress_s']:>7.2f}s "
                             f"{r['prefill_s']:>7.2f}s {r['ttft_s']:>7.2f}s "
                             + (f"{r['limit_s']:>6.2f}s {r['x_limit']:>6.1f}x" if "limit_s" in r else ""))
            else:
                tokens = f"{r['prompt_tokens']:>7,}" if "prompt_tokens" in r else f"{'':>7}"
                lines.append(f"  {r['layout']:<46} {'':>7} {tokens} {'(end to end: generate, 1 token)':>35} "
                             f"{r['ttft_s']:>7.2f}s")
                if "fovea_end_to_end_s" in r:
                    lines.append(f"  {'  fovea FastViTHD + MLP, timed the same way':<46} {'':>7} {'':>7} "
                                 f"{'(end to end, alternating)':>35} {r['fovea_end_to_end_s']:>7.2f}s")
        for name, value in result["claims"].items():
            lines.append(f"  {name}: {value:.2f}x" if isinstance(value, float) else f"  {name}: {value}")
    if "matmul_gflops" in payload:
        lines.append(f"{payload['device']} {payload['dtype']}; limit = FLOPs / the {payload['matmul_gflops']:,.0f} "
                     "GFLOP/s matmul rate measured in this run")
    lines.append(describe(payload["env"]))
    return "\n".join(lines)


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    results = payload["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(12, 0.45 * max(len(r["rows"]) for r in results.values())
                                                         * len(results) + 1.5), squeeze=False)
    colors = {"preprocess": "#bbb", "encode": "#c44", "compress": "#e93", "prefill": "#48c"}
    for ax, (llm, result) in zip(axes[:, 0], results.items(), strict=True):
        rows = result["rows"][::-1]
        names = [r["layout"] for r in rows]
        left = [0.0] * len(rows)
        for stage, color in colors.items():
            widths = [r.get(f"{stage}_s", 0.0) for r in rows]
            ax.barh(names, widths, left=left, color=color, label=stage)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        peers = [r.get("ttft_s", 0.0) if "encode_s" not in r else 0.0 for r in rows]
        ax.barh(names, peers, color="#555", label="transformers, end to end")
        for y, r in enumerate(rows):
            ax.annotate(f"{r['ttft_s']:.1f}s", (r["ttft_s"], y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_title(f"time to first token on a {payload['page']} page, LLM {llm}")
        ax.set_xlabel("seconds (sum of stage medians; peers: median end to end)")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
