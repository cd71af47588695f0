"""The `fovea` command as a user meets it."""

from __future__ import annotations

import subprocess
import sys


def _fovea(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fovea.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_on_every_command():
    top = _fovea("--help")
    assert top.returncode == 0
    for command in ("demo", "fetch-llm", "info", "ask", "serve", "bench"):
        assert command in top.stdout
        sub = _fovea(command, "--help")
        assert sub.returncode == 0 and "usage: fovea " + command in sub.stdout


def test_info_lists_registries():
    out = _fovea("info")
    assert out.returncode == 0
    assert "fastvithd" in out.stdout and "qformer" in out.stdout and "smollm2-135m-shape" in out.stdout


def test_demo_prints_the_table():
    out = _fovea("demo", "--llm", "tiny-llama", "--max-side", "256", "--threads", "2")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("ViT-L/14", "FastViTHD"))]
    assert len(rows) == 4
    tokens = [int(line.split()[-10].replace(",", "")) for line in rows]
    assert tokens[0] == 5 * 576  # AnyRes: four 336 px crops and a thumbnail for a 4:3 page
    assert tokens[2:] == [256, 64]  # the compressors' budgets
    assert "random" in out.stdout


def test_bad_argument_is_a_clear_error():
    out = _fovea("demo", "--llm", "no-such-llm", "--max-side", "128")
    assert out.returncode == 2
    assert "unknown LLM preset 'no-such-llm'" in out.stderr


def test_ask_prints_answer_and_timings(tmp_path):
    import torch
    from conftest import tiny_config
    from PIL import Image

    from fovea import VLM, save_model

    torch.manual_seed(0)
    save_model(VLM.from_config(tiny_config("fastvithd", "qformer")), tmp_path / "model")
    Image.effect_noise((300, 200), 60).convert("RGB").save(tmp_path / "page.png")
    for extra in ([], ["--stream"]):
        out = _fovea("ask", str(tmp_path / "page.png"), "What is the total?", "--model", str(tmp_path / "model"),
                     "--max-tokens", "5", *extra)
        assert out.returncode == 0, out.stderr
        assert "[8 visual /" in out.stderr and "TTFT" in out.stderr and "encode" in out.stderr
    missing = _fovea("ask", str(tmp_path / "nope.png"), "q", "--model", str(tmp_path / "model"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
