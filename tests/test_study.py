"""`fovea study connectors` on a tiny model: every cell trains and is evaluated, the table is well formed, finished
cells are not run again, and the encoder's features are computed once for the whole study."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from fovea.cli import main
from fovea.config import PRESETS
from fovea.data.documents import write_documents
from fovea.eval.study import StudyConfig, cells, run_study


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny-study", lambda: tiny_config("fastvit-mci0", "qformer", budget=4, max_side=128))
    return "tiny-study"


def test_study_runs_every_cell_and_writes_the_table(tmp_path, tiny_preset):
    train = write_documents(tmp_path / "train", num_pages=3, seed=0, sizes=((320, 256),), questions_per_page=2)
    heldout = write_documents(tmp_path / "heldout", num_pages=2, seed=1, sizes=((320, 256),), split="heldout",
                              questions_per_page=2)
    cfg = StudyConfig(data=str(train), eval_data=str(heldout), out=str(tmp_path / "study"), model=tiny_preset,
                      llm="tiny-llama", connectors=("mlp", "qformer-instruct"), budgets=(4, 8), seeds=(0,), steps=2,
                      batch_size=2, warmup_steps=0, max_tokens=3, threads=1)
    assert [c.name for c in cells(cfg)] == ["mlp-1to1-s0", "qformer-instruct-4-s0", "qformer-instruct-8-s0"]
    rows = run_study(cfg, progress=False, report=lambda _: None)
    assert [(r["variant"], r["budget"]) for r in rows] == [("mlp", None), ("qformer-instruct", 4),
                                                          ("qformer-instruct", 8)]
    assert [r["visual_tokens"] for r in rows[1:]] == [4, 8] and rows[0]["visual_tokens"] > 8  # 1:1 reads the grid
    assert all(0 <= r["exact_match"] <= 1 and r["trainable_parameters"] > 0 for r in rows)
    table = (tmp_path / "study" / "study.md").read_text().splitlines()
    assert table[0].startswith("| bridge | visual tokens |") and len(table) == 2 + 3
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    assert len(list((tmp_path / "study" / "features").glob("*.safetensors"))) == 3  # 3 pages, encoded once
    stored = json.loads((tmp_path / "study" / "study.json").read_text())
    assert len(stored["cells"]) == 3 and not (tmp_path / "study" / "mlp-1to1-s0" / "final").exists()

    before = (tmp_path / "study" / "mlp-1to1-s0" / "cell.json").stat().st_mtime_ns
    run_study(cfg, progress=False, report=lambda _: None)  # finished cells are kept, not trained again
    assert (tmp_path / "study" / "mlp-1to1-s0" / "cell.json").stat().st_mtime_ns == before


def test_study_names_bad_settings(tmp_path, capsys):
    assert main(["study", "connectors", "--data", "a.json", "--eval-data", "b.json", "--connectors", "mlp",
                 "transformer"]) == 2
    assert "unknown bridges ['transformer']" in capsys.readouterr().err
    assert main(["study", "connectors", "--data", "a.json"]) == 2
    assert "needs data (training records) and eval_data" in capsys.readouterr().err
