"""Benchmarks run end to end at tiny sizes and write what they promise (timings are not asserted)."""

from __future__ import annotations

import json

import pytest

from fovea.bench.packing import format_table, run_packing_bench


def test_packing_bench_writes_json_and_chart(tmp_path):
    payload = run_packing_bench(lm="tiny-llama", quick=True, threads=2, warmup=0, repeats=1, mix_count=4,
                                dtype="float32", out_dir=tmp_path, progress=lambda s: None)
    saved = json.loads((tmp_path / "packing.json").read_text())
    assert saved["cases"].keys() == {"seed", "random-mix"}
    png = (tmp_path / "packing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    seed = payload["cases"]["seed"]
    assert seed["real_tokens"] == sum(n // 4 for n in [50, 120, 300, 80, 4000, 60, 900, 200])
    padded, packed = seed["modes"]["padded"], seed["modes"]["fovea-packed"]
    assert padded["computed_tokens"] == 8 * 1000 and abs(padded["padding_share"] - (1 - 1427 / 8000)) < 1e-9
    assert packed["padding_share"] == 0
    dense = seed["modes"]["hf-packed-dense"]
    assert packed["attention_gflops"] < dense["attention_gflops"] < padded["attention_gflops"]
    assert "fovea-packed vs padded" in format_table(payload)
    assert saved["env"]["threads"] == 2


def test_encoder_bench_measures_and_skips_with_an_estimate(tmp_path):
    from conftest import tiny_config

    from fovea.bench.encoder import EncoderSpec, format_table, run_encoder_bench

    specs = [EncoderSpec("FastViTHD", tiny_config("fastvithd").vision),
             EncoderSpec("ViT-L/14 native", tiny_config("vit-l14-336").vision)]
    payload = run_encoder_bench(specs=specs, resolutions=[(128, 128), (256, 384)], threads=2, warmup=0, repeats=1,
                                dtypes=("float32",),
                                out_dir=tmp_path, progress=lambda s: None)
    rows = {(r["encoder"], r["image"]): r for r in payload["rows"]}
    fast_small, fast_big = rows[("FastViTHD", "128x128")], rows[("FastViTHD", "384x256")]
    assert fast_small["tokens"] == 4 and fast_big["tokens"] == 6 * 4  # stride 64
    assert rows[("ViT-L/14 native", "128x128")]["tokens"] == 10 * 10  # 128 px padded to 140 = 10 patches
    assert 0 < fast_small["gflops"] < fast_big["gflops"]
    assert all(r["median_s"] > 0 and r["runs"] == 1 for r in rows.values())
    assert "ViT-L/14 native / FastViTHD @ 128x128 (float32)" in payload["ratios"]
    assert payload["matmul_gflops"]["float32"] > 0  # the hardware limit is measured in the same run
    assert all(r["limit_s"] > 0 and r["x_limit"] == pytest.approx(r["median_s"] / r["limit_s"])
               for r in rows.values())
    assert (tmp_path / "encoder.png").read_bytes()[:4] == b"\x89PNG"
    assert "FastViTHD" in format_table(payload)
    skipped = run_encoder_bench(specs=specs[:1], resolutions=[(128, 128), (256, 384)], threads=2, warmup=0,
                                dtypes=("float32",),
                                repeats=1, max_run_s=1e-9, out_dir=tmp_path, progress=lambda s: None)
    second = skipped["rows"][1]
    assert second["skipped"] and second["estimated_s"] > 0
    with pytest.raises(ValueError, match="float16"):
        run_encoder_bench(specs=specs[:1], resolutions=[(128, 128)], device="cpu", dtypes=("float32", "float16"),
                          out_dir=tmp_path, progress=lambda s: None)


def test_ttft_bench_with_transformers_peers(tmp_path):
    from conftest import TINY_PINPOINTS, tiny_config

    from fovea.bench.ttft import Layout, format_table, run_ttft_bench

    fast = tiny_config("fastvithd").vision
    layouts = [
        Layout("ViT-L/14 AnyRes + MLP", tiny_config("vit-l14-336-anyres").vision, "llava_next", tags=["vit"]),
        Layout("FastViTHD + MLP (FastVLM)", fast, "mlp", max_side=256, tags=["fastvlm"]),
        Layout("FastViTHD + perceiver 256", fast, "perceiver", 256, max_side=256, tags=["compressor"]),
        Layout("FastViTHD + qformer 64", fast, "qformer", 64, max_side=256, tags=["compressor"]),
    ]
    llava = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14)
    payload = run_ttft_bench(llms=["tiny-llama"], layouts=layouts, threads=2, warmup=0, repeats=1, dtype="float32",
                             page_size=(280, 210), llava_vision=llava, llava_pinpoints=TINY_PINPOINTS,
                             out_dir=tmp_path, progress=lambda s: None)
    result = payload["results"]["tiny-llama"]
    rows = {r["layout"]: r for r in result["rows"]}
    assert rows["FastViTHD + MLP (FastVLM)"]["visual_tokens"] == 4 * 3  # 256x192 input, stride 64
    assert rows["FastViTHD + perceiver 256"]["visual_tokens"] == 256
    assert rows["FastViTHD + qformer 64"]["visual_tokens"] == 64
    # LLaVA-NeXT's layout (its count is held to transformers' in test_interop): the base view's 2x2 cells, then
    # the 4x4 crop grid (a 4:3 page keeps all four rows here), each row closed by a newline token.
    assert rows["ViT-L/14 AnyRes + MLP"]["visual_tokens"] == 2 * 2 + 4 * (4 + 1)
    for r in rows.values():
        assert r["ttft_s"] > 0
    # Same weights, same pixels, same prompt: transformers' FastVLM picks the same first token as fovea.
    assert rows["transformers FastVlmForConditionalGeneration"]["same_first_token"] is True
    assert rows["transformers LlavaNextForConditionalGeneration"]["prompt_tokens"] > 0
    assert "TTFT transformers FastVLM / fovea FastViTHD + MLP (both end to end)" in result["claims"]
    assert rows["transformers FastVlmForConditionalGeneration"]["fovea_end_to_end_s"] > 0
    assert (tmp_path / "ttft.png").read_bytes()[:4] == b"\x89PNG"
    assert "transformers FastVlmForConditionalGeneration" in format_table(payload)


def test_serve_bench_runs_every_mode(tmp_path):
    from conftest import tiny_config

    from fovea import VLM
    from fovea.bench.serve import format_table, run_serve_bench

    model = VLM.from_config(tiny_config("fastvit-mci0", "qformer")).eval()
    payload = run_serve_bench(model=model, llm="tiny-llama", levels=(1, 3), requests=6, max_tokens=6, pages=2,
                              dtype="float32",
                              threads=2, out_dir=tmp_path, progress=lambda s: None)
    assert "--pages 2 --levels 1 3" in payload["command"]
    for level in ("1", "3"):
        for mode in ("fovea", "fovea-caches-on", "hf-one-at-a-time", "hf-padded-batch"):
            r = payload["results"][level][mode]
            assert r["requests"] == 6 and not r["errors"], (level, mode, r["errors"])
            assert r["completion_tokens"] == sum(6 - (i % 3) for i in range(6))
            assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert "fovea / hf-padded-batch throughput" in format_table(payload)


def test_pages_bench_scales_tokens_with_pages(tmp_path):
    from conftest import tiny_config

    from fovea.bench.pages import format_table, run_pages_bench

    payload = run_pages_bench(pages=(1, 3), llm="tiny-llama", max_side=128, budget=8, threads=2, dtype="float32",
                              page_size=(320, 240), vision=tiny_config("fastvithd").vision, out_dir=tmp_path,
                              progress=lambda s: None)
    rows = {(r["pages"], r["layout"].split(",")[0]): r for r in payload["rows"]}
    assert rows[(3, "FastViTHD + Q-Former")]["visual_tokens"] == 3 * 8  # the budget, per page
    assert rows[(3, "FastViTHD + MLP")]["visual_tokens"] == 3 * rows[(1, "FastViTHD + MLP")]["visual_tokens"]
    assert all(r["ttft_s"] > 0 and r["encode_s"] > 0 for r in payload["rows"])
    assert (tmp_path / "pages.png").read_bytes()[:4] == b"\x89PNG" and "Q-Former" in format_table(payload)
