"""The reading probe: how well a pretrained encoder reads held-out rendered text, next to PP-OCRv6 on the same crops.

fovea's number comes from its encoder plus the light probe head trained with it (``fovea pretrain``); the peer is
PaddleOCR's PP-OCRv6 small recogniser run by onnxruntime through the ``rapidocr`` package, given each run's true
box (so the peer is spared text detection: an upper bound for it). Seeds are from the held-out range, never drawn
in training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from fovea.config import VisionConfig
from fovea.plotting import pyplot, save_figure
from fovea.train.reading import (
    HELD_OUT_BASE,
    Reader,
    ReadingConfig,
    ReadingHead,
    ReadingTally,
    draw_batch,
    held_out_sets,
    probe,
)
from fovea.vision import build_encoder


def load_reader(folder: str | Path) -> tuple[Reader, ReadingConfig]:
    """The encoder and probe head exported by ``fovea pretrain`` (``final/`` of a run)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / "reading.json"
    if not meta_file.is_file():
        raise ValueError(f"{folder} is not a reading run's final folder (no reading.json)")
    meta = json.loads(meta_file.read_text())
    meta.pop("evals", None)
    cfg = ReadingConfig.from_dict(meta)
    encoder = build_encoder(VisionConfig(name=cfg.encoder, weights=str(folder / "encoder.safetensors")))
    head = ReadingHead(channels=encoder.channels, stride=encoder.stride, subcells=cfg.subcells)
    try:
        head.load_state_dict(load_file(str(folder / "head.safetensors")))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"probe head {folder / 'head.safetensors'} is corrupt or does not fit: {err}") from err
    return Reader(encoder, head).eval(), cfg


def ppocr_probe(cfg: ReadingConfig, *, lines: int, blocks: int, seed_base: int = HELD_OUT_BASE,
                threads: int = 1) -> dict[str, float]:
    """PP-OCRv6 small recognition (onnxruntime) on the same held-out crops, one run's box at a time."""
    try:
        from rapidocr import RapidOCR
    except ImportError as err:
        raise ValueError("the PP-OCRv6 peer needs the rapidocr package: pip install rapidocr onnxruntime") from err
    engine = RapidOCR(params={"Global.log_level": "critical",
                              "EngineConfig.onnxruntime.intra_op_num_threads": threads})
    tally = ReadingTally()
    for kind, count, offset in held_out_sets(lines, blocks):
        for s in draw_batch(cfg, [seed_base + offset + i for i in range(count)], kind):
            arr = np.asarray(s.image)
            for (text, (x0, y0, x1, y1)), is_field in zip(s.runs, s.fields, strict=True):
                crop = arr[max(0, y0 - 4): y1 + 4, max(0, x0 - 4): x1 + 4]
                res = engine(crop, use_det=False, use_cls=False, use_rec=True)
                tally.add(kind, is_field, res.txts[0] if res.txts else "", text)
    return tally.summary()


def evaluate_reading(folder: str | Path, *, lines: int = 500, blocks: int = 50, peer: bool = True,
                     out: str | Path | None = None, threads: int | None = None) -> dict:
    """Probe accuracy of a trained reader (and the PP-OCRv6 peer) on held-out crops; writes JSON and a PNG chart
    to ``out`` when given."""
    if threads:
        torch.set_num_threads(threads)
    reader, cfg = load_reader(folder)
    t0 = time.perf_counter()
    result = {"fovea": probe(reader, cfg, torch.device("cpu"), torch.float32, lines=lines, blocks=blocks)}
    result["fovea"]["seconds"] = time.perf_counter() - t0
    if peer:
        t0 = time.perf_counter()
        result["pp-ocrv6-small"] = ppocr_probe(cfg, lines=lines, blocks=blocks, threads=threads or 1)
        result["pp-ocrv6-small"]["seconds"] = time.perf_counter() - t0
    result["settings"] = {"lines": lines, "blocks": blocks, "seed_base": HELD_OUT_BASE, "line_size": cfg.line_size,
                          "block_size": cfg.block_size, "sizes": cfg.sizes, "degrade": cfg.degrade,
                          "reader": str(folder)}
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "reading-probe.json").write_text(json.dumps(result, indent=2))
        _plot(result, path / "reading-probe.png")
    return result


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()
    keys = [("line_char_acc", "line chars"), ("field_exact", "field exact"), ("line_exact", "line exact"),
            ("block_char_acc", "page-crop chars"), ("block_exact", "page-crop runs exact")]
    systems = [k for k in result if k != "settings"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(systems)
    for i, name in enumerate(systems):
        ax.bar([j + i * width for j in range(len(keys))], [result[name].get(k, 0) for k, _ in keys], width,
               label=name)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(keys))], [label for _, label in keys])
    ax.set(ylim=(0, 1), ylabel="held-out accuracy", title="reading probe on held-out rendered text")
    ax.legend()
    save_figure(fig, path)
