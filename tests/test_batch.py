"""fovea batch: a corpus read on Ray Data actors equals the engine in this process; failures are recorded, re-runs
resume without duplicates, bad inputs fail before any worker starts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fovea import VLM, save_model
from fovea.batch.inputs import collect_documents, read_questions
from fovea.batch.runner import DocumentReader, run_batch

SCHEMA = "fields:\n  total: What is the total?\n  client: Who is the client?\nmax_tokens: 4\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "qformer", budget=8))
    model.config.preprocess.max_side = 128
    save_model(model, root / "model")
    docs = root / "docs"
    docs.mkdir()
    for i in range(4):
        Image.effect_noise((160, 120), 30 + 10 * i).convert("RGB").save(docs / f"page-{i}.png")
    frames = [Image.effect_noise((120, 160), 70 + i).convert("RGB") for i in range(2)]
    frames[0].save(docs / "scan.tiff", save_all=True, append_images=[f.copy() for f in frames[1:]])
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\nnot really")
    (root / "schema.yaml").write_text(SCHEMA)
    return root


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _in_process(corpus) -> dict:
    reader = DocumentReader(str(corpus / "model"), read_questions(corpus / "schema.yaml"), threads=1)
    return {(r["document"], r["field"]): (r["answer"], r["error"])
            for d in collect_documents(corpus / "docs") for r in reader.read(d)}


def test_two_ray_workers_equal_the_engine_in_process(corpus, tmp_path):
    pytest.importorskip("ray")
    expected = _in_process(corpus)
    out = tmp_path / "results.jsonl"
    stats = run_batch(collect_documents(corpus / "docs"), read_questions(corpus / "schema.yaml"), out,
                      model=str(corpus / "model"), workers=2, threads_per_worker=1, show_bar=False,
                      progress=lambda s: None)
    rows = _rows(out)
    assert stats["read"] == 6 and stats["failed"] == 1 and stats["rows"] == len(rows) == 5 * 2 + 1
    assert {(r["document"], r["field"]): (r["answer"], r["error"]) for r in rows} == expected
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["document"].endswith("broken.pdf") and "corrupt" in broken[0]["error"]
    tiff = [r for r in rows if r["document"].endswith("scan.tiff")]
    assert all(r["pages"] == [1, 2] and r["visual_tokens"] == 16 for r in tiff)
    # The second question about a document reuses its encode and its prefill.
    assert all(r["cached_tokens"] > 0 for r in rows if r["field"] == "client")


def test_a_rerun_after_a_kill_completes_without_duplicates(corpus, tmp_path):
    documents = collect_documents(corpus / "docs")
    questions = read_questions(corpus / "schema.yaml")
    out = tmp_path / "results.jsonl"
    run_batch(documents[:2], questions, out, model=str(corpus / "model"), use_ray=False, threads_per_worker=1,
              show_bar=False, progress=lambda s: None)
    with open(out, "a") as fh:  # a kill mid-write: half a line of the third document
        fh.write(json.dumps({"document": documents[2], "field": "total"})[:25])
    stats = run_batch(documents, questions, out, model=str(corpus / "model"), use_ray=False, threads_per_worker=1,
                      show_bar=False, progress=lambda s: None)
    rows = _rows(out)
    assert stats["skipped"] == 2 and stats["read"] == len(documents) - 2
    keys = [(r["document"], r["field"]) for r in rows]
    assert len(keys) == len(set(keys)) and {d for d, _ in keys} == set(documents)
    again = run_batch(documents, questions, out, model=str(corpus / "model"), use_ray=False, show_bar=False,
                      progress=lambda s: None)
    assert again["read"] == 0 and len(_rows(out)) == len(rows)


def test_bad_inputs_fail_before_any_worker(tmp_path, corpus):

    (tmp_path / "bad.yaml").write_text("fields:\n  total: What is the total?\ntemperature: 0.5\n")
    (tmp_path / "manifest.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    cases = [
        (["batch", str(tmp_path / "nowhere"), "--questions", str(corpus / "schema.yaml")], "does not exist"),
        (["batch", str(tmp_path / "manifest.jsonl"), "--questions", str(corpus / "schema.yaml")], "line 2 is not JSON"),
        (["batch", str(corpus / "docs"), "--questions", str(tmp_path / "bad.yaml")], "unknown keys ['temperature']"),
        (["batch", str(corpus / "docs"), "--questions", str(tmp_path / "none.yaml")], "does not exist"),
    ]
    for argv, message in cases:
        import subprocess
        import sys

        code = "import sys; from fovea.cli import main; rc = main(sys.argv[1:]); print(rc, 'ray' in sys.modules)"
        run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
        assert message in run.stderr


@pytest.mark.slow  # starts Ray twice and a server: about two minutes on 2 cores
def test_batch_bench_measures_every_mode(corpus, tmp_path):
    from fovea.bench.batch import format_table, run_batch_bench

    payload = run_batch_bench(documents=2, model=str(corpus / "model"), page_size=(320, 240), workers=(1, 2),
                              clients=2, out_dir=tmp_path, progress=lambda s: None)
    assert [r["workers"] for r in payload["rows"]] == [1, 2, 1]
    assert all(r["documents_per_hour"] > 0 for r in payload["rows"])
    assert (tmp_path / "batch.png").read_bytes()[:4] == b"\x89PNG" and "fovea serve" in format_table(payload)
