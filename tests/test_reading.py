"""The reading curriculum: deterministic renders with true labels, a loss that falls, exact resume, clear errors,
and the bundled reading encoder reading held-out text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fovea.data.reading import LAYOUTS, available_fonts, decode_ids, encode_text, render_text
from fovea.train.reading import ReadingConfig, _save, build_reader, ctc_loss, greedy_decode, train_reading

SMALL = dict(line_size=(32, 128), block_size=(64, 128), lines=3, blocks=1, eval_lines=4, eval_blocks=1, threads=1,
             dtype="float32",
             warmup_steps=2, save_every=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_render_is_deterministic_by_seed(layout):
    size = (32, 256) if layout == "line" else (128, 256)
    a, b = (render_text(11, layout=layout, height=size[0], width=size[1]) for _ in range(2))
    c = render_text(12, layout=layout, height=size[0], width=size[1])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.runs == b.runs and a.fields == b.fields
    assert a.runs and (a.runs != c.runs or not np.array_equal(np.asarray(a.image), np.asarray(c.image)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_labels_match_the_ink(layout):
    """Clean renders: every run's box holds ink, and there is no ink outside the runs' boxes."""
    for seed in range(6):
        size = (32, 384) if layout == "line" else (160, 384)
        s = render_text(seed, layout=layout, height=size[0], width=size[1], degrade=0.0)
        gray = np.asarray(s.image.convert("L"), dtype=np.int32)
        paper = np.median(gray)
        ink = np.abs(gray - paper) > 40
        covered = np.zeros_like(ink)
        for text, (x0, y0, x1, y1) in s.runs:
            assert text and text == text.strip()
            assert ink[y0:y1, x0:x1].any(), f"run {text!r} has no ink in its box"
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any(), f"ink outside the labelled boxes (seed {seed}, {layout})"


def test_labels_read_back_by_an_ocr_model():
    """The text drawn is the label: PP-OCRv6 (an independent reader) reads clean line renders as their labels."""
    rapidocr = pytest.importorskip("rapidocr")
    engine = rapidocr.RapidOCR(params={"Global.log_level": "critical"})
    agree, total = 0, 0
    for seed in range(40):
        s = render_text(seed, layout="line", height=48, width=512, sizes=(22, 30), degrade=0.0)
        guess = engine(np.asarray(s.image), use_det=False, use_cls=False, use_rec=True).txts
        agree += bool(guess) and guess[0].replace(" ", "") == s.runs[0][0].replace(" ", "")
        total += 1
    assert agree / total >= 0.9, f"only {agree}/{total} clean lines read back as their labels"


def test_ctc_codec_round_trip():
    text = "Total: EUR 1,234.50 (due 03/04/25)"
    assert decode_ids(encode_text(text)) == text
    ids = encode_text("aab")
    slots = torch.full((7, 96), -30.0)
    for i, k in enumerate([ids[0], 0, ids[1], ids[1], 0, ids[2], 0]):  # a _ a a _ b _
        slots[i, k] = 0.0
    assert greedy_decode(slots) == "aab"
    assert ctc_loss([slots.log_softmax(-1)], ["aab"]) < 0.1


def test_training_lowers_the_loss(tmp_path):
    cfg = ReadingConfig(out=str(tmp_path / "run"), steps=8, lr=3e-3, eval_every=0, degrade=0.0, **SMALL)
    result = train_reading(cfg, progress=False)
    assert np.mean(result.losses[-3:]) < 0.7 * np.mean(result.losses[:2])
    assert (result.final / "encoder.safetensors").is_file() and (tmp_path / "run" / "curve.png").is_file()
    assert 0.0 <= result.evals[-1]["line_char_acc"] <= 1.0


def test_resume_equals_uninterrupted(tmp_path):
    full = train_reading(ReadingConfig(out=str(tmp_path / "a"), steps=4, eval_every=0, **SMALL), progress=False)
    train_reading(ReadingConfig(out=str(tmp_path / "b"), steps=2, eval_every=0, **SMALL), progress=False)
    resumed = train_reading(ReadingConfig(out=str(tmp_path / "b"), steps=4, eval_every=0, **SMALL), resume=True,
                            progress=False)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    cfg = ReadingConfig(out=str(tmp_path / "r"), steps=2, eval_every=0, **SMALL)
    train_reading(cfg, progress=False)
    (tmp_path / "r" / "checkpoints" / "step-0000009.tmp").mkdir()  # a save killed before its rename
    resumed = train_reading(ReadingConfig(out=str(tmp_path / "r"), steps=3, eval_every=0, **SMALL), resume=True,
                            progress=False)
    assert len(resumed.losses) == 3


def test_corrupt_checkpoint_is_named(tmp_path):
    cfg = ReadingConfig(out=str(tmp_path / "r"), steps=2, eval_every=0, **SMALL)
    train_reading(cfg, progress=False)
    ckpt = sorted((tmp_path / "r" / "checkpoints").glob("step-*"))[-1]
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="step-0000002"):
        train_reading(ReadingConfig(out=str(tmp_path / "r"), steps=3, eval_every=0, **SMALL), resume=True,
                      progress=False)


@pytest.mark.parametrize(("change", "message"), [
    ({"encoder": "no-such-encoder"}, "unknown encoder 'no-such-encoder'"),
    ({"fonts": ("Comic.ttf",)}, r"font\(s\) \['Comic.ttf'\] do not exist"),
    ({"line_size": (30, 128)}, r"line_size 128x30 \(WxH\) is not divisible by the encoder stride 16"),
    ({"sizes": (10, 40)}, r"sizes \(10, 40\) must satisfy"),
    ({"lines": 0, "blocks": 0}, "not both 0"),
])
def test_bad_settings_fail_before_training(tmp_path, change, message):
    cfg = ReadingConfig(out=str(tmp_path / "bad"), steps=2, **{**SMALL, **change})
    with pytest.raises(ValueError, match=message):
        train_reading(cfg, progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_fonts_are_the_machines():
    assert "DejaVuSans.ttf" in available_fonts()


def test_corrupt_encoder_weights_are_named(tmp_path):
    from fovea.config import VisionConfig
    from fovea.vision import build_encoder

    bad = tmp_path / "enc.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="enc.safetensors.*corrupt"):
        build_encoder(VisionConfig(name="fovea-reader", weights=str(bad)))


def test_saved_checkpoint_roundtrip(tmp_path):
    cfg = ReadingConfig(out=str(tmp_path), **SMALL)
    reader = build_reader(cfg)
    opt = torch.optim.AdamW(reader.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _save(tmp_path, 5, reader, opt, sched, {"losses": [], "evals": [], "cpu_seconds": 0.0}, keep_last=1)
    state = torch.load(tmp_path / "checkpoints" / "step-0000005" / "state.pt", weights_only=False)
    assert state["step"] == 5 and set(state["model"]) == set(reader.state_dict())


def test_bundled_reader_reads_held_out_text():
    """The committed reading encoder + probe head read held-out lines far above chance (a random head reads ~0%)."""
    from fovea.eval.ocr import load_reader
    from fovea.train.reading import probe
    from fovea.vision import bundled_reader_dir

    reader, cfg = load_reader(bundled_reader_dir())
    result = probe(reader, cfg, torch.device("cpu"), torch.float32, lines=16, blocks=2)
    assert result["line_char_acc"] > 0.6, result  # 78.9% on the 96-line held-out probe


def test_reader_preset_builds_with_the_bundled_encoder():
    from fovea import VLM
    from fovea.config import preset
    from fovea.vision import bundled_reader_dir

    config = preset("reader-qformer-64")
    assert config.vision.weights == "bundled:reader"
    model = VLM.from_config(config)
    from safetensors.torch import load_file

    stored = load_file(str(bundled_reader_dir() / "encoder.safetensors"))
    key = next(k for k in stored if k.endswith("weight") and stored[k].ndim == 4)
    assert torch.equal(model.encoder.model.state_dict()[key], stored[key].float())
    assert model.num_visual_tokens(1152, 1536) == 64


def test_skew_keeps_labels_and_is_bounded():
    flat = render_text(3, layout="paragraph", height=160, width=384)
    skewed = render_text(3, layout="paragraph", height=160, width=384, rotate=0.5)
    assert skewed.runs == flat.runs
    assert not np.array_equal(np.asarray(skewed.image), np.asarray(flat.image))
    with pytest.raises(ValueError, match="rotate 5 must be in"):
        render_text(3, layout="line", height=32, width=384, rotate=5)


def test_a_run_can_start_from_the_bundled_reader(tmp_path):
    """A later session continues the curriculum from the shipped weights (encoder and probe head)."""
    from fovea.eval.ocr import load_reader
    from fovea.vision import bundled_reader_dir

    shipped, _ = load_reader(bundled_reader_dir())
    reader = build_reader(ReadingConfig(out=str(tmp_path), init="bundled:reader"))
    for (name, a), (_, b) in zip(shipped.state_dict().items(), reader.state_dict().items(), strict=True):
        assert torch.equal(a.float(), b.float()), name
