"""Bundles (what fovea ships as its document reader): a bundle rebuilt from its named encoder and LLM, bf16 bridge and
unmerged LoRA adapters equals the training run it came from; missing, corrupt or mismatched parts are named."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from fovea import VLM, load_model, save_model
from fovea.checkpoint import BRIDGE_NAME, BUNDLE_NAME, export_bundle, load_bundle
from fovea.config import LMConfig
from fovea.data.documents import write_documents
from fovea.data.records import encode_record, read_records
from fovea.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny LoRA finetune whose encoder weights sit in a file and whose LLM is a local directory (both can be
    named by a bundle, as the document reader names bundled:reader and SmolLM2)."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    base = tiny_config("fovea-reader", "qformer", budget=8, max_side=160, instruction_aware=True)
    vlm = VLM.from_config(base)
    save_file({k: v.contiguous() for k, v in vlm.encoder.state_dict().items()}, str(root / "encoder.safetensors"))
    vlm.lm.save_pretrained(root / "llm")
    vlm.tokenizer.save_pretrained(root / "llm")
    config = replace(base, vision=replace(base.vision, weights=str(root / "encoder.safetensors")),
                     lm=LMConfig(name="local", path=str(root / "llm")))
    save_model(VLM.from_config(config), root / "model")
    write_documents(root / "data", num_pages=2, seed=0, sizes=((384, 288),), questions_per_page=2, damage=0.0)
    train(TrainConfig(data=str(root / "data" / "data.json"), model=str(root / "model"), out=str(root / "run"),
                      stage="finetune", lora_rank=4, steps=3, batch_size=2, lr=5e-3, warmup_steps=0, eval_every=0,
                      eval_fraction=0.0, eval_samples=1, eval_max_tokens=2, threads=1), progress=False)
    return root


def _logits(model, record) -> torch.Tensor:
    model.eval()
    sample = encode_record(record, model.processor())
    with torch.no_grad():
        return model(sample.input_ids[None], sample.images, sample.instructions, sample.image_sizes).logits


def test_a_bundle_equals_the_run_it_came_from(run, tmp_path):
    bundle = export_bundle(run / "run", tmp_path / "bundle", encoder_weights=str(run / "encoder.safetensors"),
                           card={"licence": "Apache-2.0"})
    assert (bundle / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("lm." in p.name for p in bundle.rglob("*"))  # the LLM is named, not copied
    loaded = load_bundle(bundle)
    final = load_model(run / "run" / "final")
    with torch.no_grad():  # the bundle keeps the bridge in bf16
        for p in final.connector.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    record = read_records(run / "data" / "data.json")[0]
    torch.testing.assert_close(_logits(loaded, record), _logits(final, record), rtol=1e-4, atol=1e-4)
    assert json.loads((bundle / BUNDLE_NAME).read_text())["card"]["licence"] == "Apache-2.0"
    shutil.rmtree(bundle / "adapter")  # the oracle can fail: without its adapters the bundle is another model
    assert (_logits(load_bundle(bundle), record) - _logits(final, record)).abs().max() > 1e-2


def test_missing_corrupt_or_foreign_parts_are_named(run, tmp_path):
    bundle = export_bundle(run / "run", tmp_path / "bundle", encoder_weights=str(run / "encoder.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / BRIDGE_NAME).write_bytes((bundle / BRIDGE_NAME).read_bytes()[:100])
    with pytest.raises(ValueError, match=f"bridge weights .*{BRIDGE_NAME}.* are corrupt"):
        load_bundle(broken)
    (broken / BRIDGE_NAME).unlink()
    with pytest.raises(ValueError, match=f"missing {BRIDGE_NAME}"):
        load_bundle(broken)
    (broken / BUNDLE_NAME).write_text("{not json")
    shutil.copy(bundle / BRIDGE_NAME, broken / BRIDGE_NAME)
    with pytest.raises(ValueError, match=f"{BUNDLE_NAME}.* is corrupt"):
        load_bundle(broken)

    other = VLM.from_config(tiny_config("fovea-reader", "qformer", budget=8, max_side=160, instruction_aware=True))
    save_file({k: v.contiguous() for k, v in other.encoder.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not the encoder"):
        export_bundle(run / "run", tmp_path / "x", encoder_weights=str(tmp_path / "other.safetensors"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="no finished training run"):
        export_bundle(tmp_path, tmp_path / "y")


def test_the_demo_asks_held_out_pages_and_marks_answers_by_exact_match(run):
    from fovea.bench.demo import DEMO_PAGES, format_answers, read_pages
    from fovea.eval.qa import normalise

    answers = read_pages(load_model(run / "run" / "final"), questions=2, progress=lambda s: None)
    assert len(answers) == 2 * len(DEMO_PAGES) and {a.kind for a in answers} == {k for k, _ in DEMO_PAGES}
    assert all(a.right == (normalise(a.answer) == normalise(a.reference)) for a in answers)
    text = format_answers(answers)
    assert f"{sum(a.right for a in answers)} of {len(answers)} right" in text


def test_bench_ttft_times_one_trained_model_against_its_flop_limit(run, tmp_path):
    from fovea.bench.ttft import format_table, run_ttft_bench

    model = str(run / "run" / "final")
    payload = run_ttft_bench(model=model, warmup=0, repeats=1, budget_s=5.0, out_dir=tmp_path, device="cpu",
                             dtype="float32", progress=lambda s: None)
    (row,) = payload["results"][model]["rows"]
    assert row["ttft_s"] > 0 and row["limit_s"] > 0 and row["x_limit"] == row["ttft_s"] / row["limit_s"]
    assert row["visual_tokens"] == 8 and "--model" in payload["command"]
    assert model in format_table(payload) and (tmp_path / "ttft.png").is_file()
