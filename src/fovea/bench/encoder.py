"""`fovea bench encoder`: latency, peak memory, GFLOPs and output tokens versus resolution, per encoder.

Encoders run with random weights (cost does not depend on the values), FastViT blocks fused for inference as
deployed. GFLOPs come from torch's FlopCounterMode on the meta device (no compute). A measurement whose estimated
single run exceeds ``max_run_s`` is skipped and recorded with its estimate, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fovea.bench.common import (
    count_flops,
    describe,
    environment,
    matmul_gflops,
    peak_memory_mb,
    reset_peak_memory,
    save_results,
    time_adaptive,
)
from fovea.config import VisionConfig
from fovea.log import say
from fovea.plotting import pyplot, save_figure
from fovea.preprocess import grid_pinpoints
from fovea.runtime import dtype_name, placement
from fovea.vision import Encoder, build_encoder
from fovea.vision.base import place_encoder, run_encoder

# (height, width) of the test images: squares, then a 2880x2160 landscape page.
RESOLUTIONS: list[tuple[int, int]] = [(336, 336), (672, 672), (1024, 1024), (1536, 1536), (2160, 2880)]
QUICK_RESOLUTIONS: list[tuple[int, int]] = [(336, 336), (672, 672), (1024, 1024)]


@dataclass
class EncoderSpec:
    label: str  # name in tables and charts
    config: VisionConfig  # how to build it


def default_specs(max_grid: int = 9) -> list[EncoderSpec]:
    wide = grid_pinpoints(336, max_grid)  # AnyRes that keeps a 2880x2160 page near native resolution
    return [
        EncoderSpec("ViT-L/14 native", VisionConfig(name="vit-l14-336")),
        EncoderSpec("ViT-L/14 AnyRes tiles", VisionConfig(name="vit-l14-336-anyres", pinpoints=wide)),
        EncoderSpec("FastViTHD", VisionConfig(name="fastvithd")),
        EncoderSpec("FastViT MCi0 (small hybrid)", VisionConfig(name="fastvit-mci0")),
        EncoderSpec("fovea-reader (stride 16)", VisionConfig(name="fovea-reader")),
    ]


def input_size(encoder: Encoder, height: int, width: int) -> tuple[int, int]:
    """The pixel size each encoder sees for an image of ``height`` x ``width``: its own resizing rule with the long
    side kept (AnyRes picks its pinpoint)."""
    return encoder.input_size(height, width, max(height, width), upscale=True)


def _flops(spec: EncoderSpec, size: tuple[int, int]) -> float:
    with torch.device("meta"):
        enc = build_encoder(spec.config).eval()
        enc.reparameterize()
        pixels = torch.empty(1, 3, *size)
        with torch.no_grad():
            return count_flops(lambda: enc.features(pixels))


@torch.inference_mode()
def _time_encoder(encoder: Encoder, size: tuple[int, int], autocast: torch.dtype | None, **kw) -> Any:
    pixels = torch.randn(1, 3, *size)
    return time_adaptive(lambda: run_encoder(encoder, pixels, autocast), **kw)


def run_encoder_bench(*, specs: list[EncoderSpec] | None = None, resolutions: list[tuple[int, int]] | None = None,
                      quick: bool = False, threads: int | None = None, warmup: int = 1, repeats: int = 3,
                      budget_s: float = 120.0, max_run_s: float = 300.0, out_dir: str | Path = "bench-results",
                      device: str = "auto", dtypes: tuple[str, ...] = ("auto",),
                      progress: Callable[[str], None] = say) -> dict[str, Any]:
    """Every encoder at every resolution in every dtype of ``dtypes`` (each by its family's recipe), with the
    hardware limit: the encoder's FLOPs over the matmul rate measured in this run in that dtype."""
    places = [placement(device, d, threads) for d in dtypes]  # every dtype checked before anything runs
    env = environment()
    specs = specs if specs is not None else default_specs()
    resolutions = resolutions or (QUICK_RESOLUTIONS if quick else RESOLUTIONS)
    rates = {dtype_name(p.dtype): matmul_gflops(p.dtype, p.device) for p in places}
    progress(f"[bench encoder] {describe(env)}; {', '.join(rates)} on {places[0].device}, random weights, batch 1; "
             "matmul " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in rates.items()))
    rows: list[dict[str, Any]] = []
    for spec in specs:
        encoder = build_encoder(spec.config).eval()
        encoder.reparameterize()
        for place in places:
            rows += _encoder_rows(spec, encoder, place, resolutions, rates[dtype_name(place.dtype)], warmup=warmup,
                                  repeats=repeats, budget_s=budget_s, max_run_s=max_run_s, progress=progress)
        del encoder  # free it before the next one is built: peak memory is per encoder
    payload = {"benchmark": "encoder", "env": env, "rows": rows, "quick": quick, "matmul_gflops": rates,
               "ratios": ratios(rows), "command": "fovea bench encoder" + (" --quick" if quick else "")
               + f" --dtype {','.join(dtypes)}"}
    return save_results(payload, out_dir, "encoder", chart, progress)


def _encoder_rows(spec: EncoderSpec, encoder: Encoder, place, resolutions, rate: float, *, warmup: int, repeats: int,
                  budget_s: float, max_run_s: float, progress) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    autocast = place_encoder(encoder, place.device, place.dtype)
    dtype = dtype_name(place.dtype)
    gflop_per_s = None  # measured throughput of this encoder, to estimate the next resolution
    for height, width in resolutions:
        size = input_size(encoder, height, width)
        tokens = encoder.num_tokens(*size)
        gflops = _flops(spec, size) / 1e9
        row: dict[str, Any] = {"encoder": spec.label, "image": f"{width}x{height}", "input": f"{size[1]}x{size[0]}",
                               "tokens": tokens, "gflops": gflops, "dtype": dtype, "limit_s": gflops / rate}
        estimate = gflops / gflop_per_s if gflop_per_s else None
        if estimate is not None and estimate > max_run_s:
            row.update(skipped=True, estimated_s=estimate)
            progress(f"[bench encoder] {spec.label} @ {row['image']}: skipped, estimated {estimate:.0f} s per run "
                     f"> --max-run-s {max_run_s:.0f}")
            rows.append(row)
            continue
        progress(f"[bench encoder] {spec.label} {dtype} @ {row['image']} (input {row['input']}, {tokens:,} tokens, "
                 f"{gflops:,.0f} GFLOP) ...")
        reset_peak_memory()
        timing = _time_encoder(encoder, size, autocast, warmup=warmup, repeats=repeats, budget_s=budget_s)
        gflop_per_s = gflops / timing.median_s
        row.update(skipped=False, **timing.to_dict(), peak_mb=peak_memory_mb(),
                   x_limit=timing.median_s / row["limit_s"])
        progress(f"[bench encoder]   median {timing.median_s:.2f} s (min {timing.min_s:.2f}, max "
                 f"{timing.max_s:.2f}, {timing.runs} runs), peak {row['peak_mb'] or 0:,.0f} MB")
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """ViT-L/14 (native and tiles) time over FastViTHD time at each image size both measured, in the same dtype;
    and each encoder's fp32 time over its low-precision time."""
    by = {(r["encoder"], r["image"], r.get("dtype", "float32")): r for r in rows if not r.get("skipped")}
    out = {}
    for (enc, image, dtype), r in by.items():
        fast = by.get(("FastViTHD", image, dtype))
        if fast and enc.startswith("ViT-L/14"):
            out[f"{enc} / FastViTHD @ {image} ({dtype})"] = r["median_s"] / fast["median_s"]
        full = by.get((enc, image, "float32"))
        if full and dtype != "float32":
            out[f"{enc} float32 / {dtype} @ {image}"] = full["median_s"] / r["median_s"]
    return out


def format_table(payload: dict[str, Any]) -> str:
    head = f"{'encoder':<28} {'dtype':>8} {'image':>10} {'input':>10} {'tokens':>8} {'GFLOP':>9} {'median':>9} " \
           f"{'min-max':>15} {'runs':>4} {'peak MB':>8} {'limit':>8} {'x limit':>7}"
    lines = [head, "-" * len(head)]
    for r in payload["rows"]:
        if r.get("skipped"):
            lines.append(f"{r['encoder']:<28} {r.get('dtype', ''):>8} {r['image']:>10} {r['input']:>10} "
                         f"{r['tokens']:>8,} {r['gflops']:>9,.0f}   skipped (estimated {r['estimated_s']:,.0f} s "
                         "per run)")
            continue
        spread = f"{r['min_s']:.2f}-{r['max_s']:.2f} s"
        limit = f"{r['limit_s']:.2f} s" if "limit_s" in r else "-"
        times = f"{r['x_limit']:.1f}x" if "x_limit" in r else "-"
        lines.append(f"{r['encoder']:<28} {r.get('dtype', ''):>8} {r['image']:>10} {r['input']:>10} {r['tokens']:>8,} "
                     f"{r['gflops']:>9,.0f} {r['median_s']:>7.2f} s {spread:>15} {r['runs']:>4} "
                     f"{r['peak_mb'] or 0:>8,.0f} {limit:>8} {times:>7}")
    for name, value in payload["ratios"].items():
        lines.append(f"{name}: {value:.1f}x")
    lines.append(describe(payload["env"]))
    return "\n".join(lines)


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(13, 4.8))
    series = list(dict.fromkeys((r["encoder"], r.get("dtype", "float32")) for r in payload["rows"]))
    for enc, dtype in series:
        rows = [r for r in payload["rows"] if (r["encoder"], r.get("dtype", "float32")) == (enc, dtype)
                and not r.get("skipped")]
        if not rows:
            continue
        pixels = [int(r["image"].split("x")[0]) * int(r["image"].split("x")[1]) / 1e6 for r in rows]
        ax_t.plot(pixels, [r["median_s"] for r in rows], marker="o", label=f"{enc} {dtype}",
                  linestyle="-" if dtype == "float32" else "--")
        if "limit_s" in rows[0]:
            ax_t.plot(pixels, [r["limit_s"] for r in rows], color="grey", lw=0.6, linestyle=":")
        ax_n.plot(pixels, [r["tokens"] for r in rows], marker="o", label=f"{enc} {dtype}")
    for ax, label in ((ax_t, "encoder latency, median (s)"), (ax_n, "output tokens")):
        ax.set_xlabel("image megapixels")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    dtypes = ", ".join(payload.get("matmul_gflops", {"float32": 0}))
    fig.suptitle(f"fovea bench encoder ({payload['env']['threads']} threads, {payload['env']['device']}, {dtypes}; "
                 "dotted: FLOPs / measured matmul rate)")
    save_figure(fig, path)
