"""`fovea eval` (document question answering): scoring on a hand-made set, and the command end to end."""

from __future__ import annotations

import json

import torch
from conftest import tiny_config

from fovea import VLM, save_model
from fovea.cli import main
from fovea.data.records import Record, read_records
from fovea.data.synth import write_dataset
from fovea.eval.qa import REFUSAL, make_row, normalise, question_kind, score, table


def _record(rid, reference, *, kind="invoice", field="total", **meta):
    return Record(id=rid, messages=[{"role": "user", "content": "<image>\nWhat is it?"},
                                    {"role": "assistant", "content": reference}], meta={"kind": kind, "field": field,
                                                                                       **meta})


def test_normalisation_ignores_case_whitespace_currency_and_a_final_stop_only():
    assert normalise("  $1,204.50 ") == normalise("1,204.50") == normalise("€1,204.50.")
    assert normalise("ACME  Holdings\nLtd") == normalise("acme holdings ltd")
    assert normalise("1,204.50") != normalise("1204.50")  # digits and separators still count
    assert normalise("30 days") != normalise("30")


def test_question_kinds_group_numbered_fields_and_refusals():
    assert question_kind({"field": "clause_3_title"}, "Term") == "clause_title"
    assert question_kind({"field": "table_storage_total"}, "$5") == "table_total"
    assert question_kind({"field": "qty_paper"}, "4") == "quantity"
    assert question_kind({"field": "total"}, "$5") == "total"
    assert question_kind({"field": "total"}, REFUSAL) == "absent"
    assert question_kind({"question_kind": "yes/no", "field": "total"}, "Yes") == "yes/no"
    assert question_kind({}, "x") == "unlabelled"


def test_scores_count_right_and_wrong_answers_on_a_hand_made_set():
    answered = [
        (_record(1, "$1,204.50"), "1,204.50", True),                      # currency does not count
        (_record(2, "$99.00"), "$98.00", False),
        (_record(3, "ACME Ltd", field="seller"), "acme ltd.", True),
        (_record(4, "Term", kind="lease", field="clause_2_title"), "Term", True),
        (_record(5, "Rent", kind="lease", field="clause_4_title"), "Not on the page.", False),  # refused, wrongly
        (_record(6, REFUSAL, kind="lease", field="deposit"), "$500", False),                   # invented
        (_record(7, REFUSAL, kind="lease", field="deposit"), "not on the page", True),
    ]
    rows = [make_row(r, answer, ttft_ms=100.0 * r.id, cold=r.id in (1, 4)) for r, answer, _ in answered]
    assert [row.hit for row in rows] == [hit for _, _, hit in answered]
    result = score(rows)
    assert (result["n"], result["correct"]) == (7, 4)
    assert result["by_question_kind"]["total"] == {"n": 2, "correct": 1, "exact_match": 0.5}
    assert result["by_question_kind"]["clause_title"]["correct"] == 1
    assert result["by_question_kind"]["absent"] == {"n": 2, "correct": 1, "exact_match": 0.5}
    assert result["by_document_kind"]["invoice"]["correct"] == 2 and result["by_document_kind"]["lease"]["n"] == 4
    assert result["invented"] == {"n": 2, "rate": 0.5}
    assert result["refused_answerable"] == {"n": 5, "rate": 0.2}
    assert result["ttft_ms"] == {"median": 400.0, "median_cold": 250.0, "median_warm": 500.0}
    text = table(result)
    assert "| all | all | 7 | 4 | 57.1% |" in text and "Invented an answer on 50.0% of 2" in text


def test_fovea_eval_answers_every_record_and_writes_the_report(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(VLM.from_config(tiny_config("fastvithd", "qformer", budget=8)), tmp_path / "model")
    data = write_dataset(tmp_path / "data", num_pages=2, seed=3, size=(320, 240), questions_per_page=2)
    assert main(["eval", str(data), "--model", str(tmp_path / "model"), "--max-tokens", "4", "--threads", "1",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "qa-eval.json").read_text())
    records = read_records(data)
    assert [r["id"] for r in report["rows"]] == [r.id for r in records]
    assert report["correct"] == sum(r["hit"] for r in report["rows"])
    for row in report["rows"]:
        assert row["hit"] == (normalise(row["answer"]) == normalise(row["reference"]))
        assert row["ttft_ms"] > 0
    assert set(report["by_document_kind"]) == {r.meta["kind"] for r in records}
    assert sum(r["cold"] for r in report["rows"]) == 2  # each page encoded once, for all its questions
    assert (tmp_path / "out" / "qa-eval.png").stat().st_size > 0
    assert "| all | all | 4 |" in capsys.readouterr().out


def test_fovea_eval_names_a_bad_data_file(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.json")]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err
