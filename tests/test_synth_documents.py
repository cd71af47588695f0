"""The document generator behind `fovea synth`: deterministic, every answer drawn on its page (checked against
what was drawn, and read back by PP-OCRv6), held-out wordings kept out of training, questions of every kind."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import ImageDraw

from fovea.cli import main
from fovea.data import document_kinds, documents
from fovea.data.documents import KINDS, QUESTION_KINDS, REFUSAL, pick_questions, render_document, write_documents


def _drawn(monkeypatch, kind: str, seed: int, **kw) -> tuple[documents.Document, list[tuple]]:
    """Render with what the page draws recorded in order: ("text", s), ("box",) and ("line",) events."""
    events: list[tuple] = []
    text, box, line = documents.Sheet.text, documents.Sheet.box, ImageDraw.ImageDraw.line

    def on_text(self, x, y, s, *args, **kwargs):
        events.append(("text", s))
        return text(self, x, y, s, *args, **kwargs)

    def on_box(self, *args, **kwargs):
        events.append(("box",))
        return box(self, *args, **kwargs)

    def on_line(self, *args, **kwargs):
        events.append(("line",))
        return line(self, *args, **kwargs)

    monkeypatch.setattr(documents.Sheet, "text", on_text)
    monkeypatch.setattr(documents.Sheet, "box", on_box)
    monkeypatch.setattr(ImageDraw.ImageDraw, "line", on_line)
    return render_document(kind, seed, **kw), events


def _ticked_answer(events: list[tuple], labels: tuple[str, ...]) -> str | None:
    """What the drawn boxes say about a check: "[x] Label" is Yes, "[ ] Label" No; "Label: [ ] Yes [x] No" No."""
    marks = []  # (word after the box, ticked)
    for i, event in enumerate(events):
        if event[0] == "box":
            ticked = events[i + 1][0] == "line"
            word = next(e[1] for e in events[i + 1:] if e[0] == "text")
            marks.append((i, word, ticked))
    for i, word, ticked in marks:
        if word in labels:
            return "Yes" if ticked else "No"
        if word == "Yes" and events[i - 1][0] == "text" and events[i - 1][1][:-1] in labels:
            return "Yes" if ticked else "No"
    return None


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_answer_is_drawn_on_its_page(monkeypatch, kind):
    """Each fact's answer is text the page drew (clause answers may wrap across lines: joined by spaces), or for
    yes/no the tick in the box that says it; each "absent" question asks about something the page does not carry."""
    for seed in range(3):
        size = (2880, 2160) if seed % 2 else (2160, 2880)
        doc, events = _drawn(monkeypatch, kind, seed, size=size, damage=0)
        text = " ".join(e[1] for e in events if e[0] == "text")
        assert doc.facts, f"{kind} seed {seed} drew no facts"
        for fact in doc.facts:
            assert fact.kind in QUESTION_KINDS and fact.question.endswith(("?", "."))
            if fact.kind == "yes/no":
                said = _ticked_answer(events, document_kinds.CHECKS[fact.key].labels)
                assert said == fact.answer, f"{kind} seed {seed}: {fact.key} is {fact.answer} but the boxes say {said}"
            else:
                assert fact.answer in text, f"{kind} seed {seed}: {fact.key}={fact.answer!r} is not drawn"
        keys = {f.key for f in doc.facts}
        for fact in doc.absent:
            assert fact.answer == REFUSAL and fact.key not in keys and fact.kind == "absent"
        answers = [f.answer for f in doc.facts if f.kind == "field"]
        assert len(answers) == len(set(answers)), "two fields share a value: their questions would be ambiguous"


def test_answers_read_back_by_an_ocr_model():
    """Independent of the drawing code: PP-OCRv6 reads clean pages, and the field values are in what it reads."""
    rapidocr = pytest.importorskip("rapidocr")
    engine = rapidocr.RapidOCR(params={"Global.log_level": "critical"})
    found, total = 0, 0
    for i, kind in enumerate(("invoice", "lease", "form")):
        doc = render_document(kind, 10 + i, size=(1440, 1080), damage=0)
        read = " ".join(engine(np.asarray(doc.image)).txts or ()).replace(" ", "")
        for fact in doc.facts:
            if fact.kind == "field":
                total += 1
                found += fact.answer.replace(" ", "") in read
    assert total >= 6 and found / total >= 0.85, f"only {found}/{total} field values read back"


def test_pages_are_deterministic_by_seed(tmp_path):
    a = write_documents(tmp_path / "a", num_pages=3, seed=5, sizes=((640, 480),))
    b = write_documents(tmp_path / "b", num_pages=3, seed=5, sizes=((640, 480),))
    c = write_documents(tmp_path / "c", num_pages=3, seed=6, sizes=((640, 480),))
    assert a.read_text() == b.read_text() != c.read_text()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_held_out_wordings_never_appear_in_training():
    """Titles, labels, question wordings, fonts and field layouts of the held-out split are kept out of training."""
    asked = {"train": set(), "heldout": set()}
    for split in asked:
        for seed in range(40):
            doc = render_document(sorted(KINDS)[seed % len(KINDS)], seed, size=(640, 480), split=split, damage=0)
            asked[split] |= {f.question for f in doc.facts + doc.absent if f.kind != "table"}
    assert asked["train"] and asked["heldout"] and not asked["train"] & asked["heldout"]
    for options in (documents.FAMILIES, documents.FIELD_STYLES):
        assert options[-1] not in document_kinds.variants(options, "train")


def test_questions_cover_the_kinds_and_refusals():
    counts = dict.fromkeys(QUESTION_KINDS, 0)
    for seed in range(60):
        doc = render_document(sorted(KINDS)[seed % len(KINDS)], seed, size=(960, 720), damage=0)
        for fact in pick_questions(doc, 4, random.Random(seed)):
            counts[fact.kind] += 1
    assert all(n > 0 for n in counts.values()), counts
    assert 0.05 < counts["absent"] / sum(counts.values()) < 0.35, counts


def test_pdf_documents_ask_only_what_their_pages_answer(tmp_path):
    data = write_documents(tmp_path, num_pages=3, seed=2, sizes=((640, 480),), pdf_pages=2)
    records = json.loads(data.read_text())
    names = sorted({r["image"][0].split("#")[0] for r in records})
    assert len(names) == 2 and names[0] == "docs/doc-000000.pdf"  # 3 pages: a 2-page PDF, then a 1-page one
    assert sorted({len(r["image"]) for r in records}) == [1, 2]
    assert all(r["question_kind"] != "absent" for r in records)
    assert all(r["conversations"][0]["value"].count("<image>") == len(r["image"]) for r in records)


def test_cli_synth_kinds_split_and_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", str(out), "--pages", "2", "--size", "640x480", "--kinds", "lease,receipt",
                 "--split", "heldout", "--seed", "1"]) == 0
    records = json.loads((out / "data.json").read_text())
    assert {r["kind"] for r in records} == {"lease", "receipt"}
    assert all({"field", "question_kind"} <= set(r) for r in records)
    assert main(["synth", str(tmp_path / "x"), "--kinds", "invoice,menu"]) == 2
    assert "unknown document kinds ['menu']" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "y"), "--size", "2880x2160,huge"]) == 2
    assert "--size must be WIDTHxHEIGHT" in capsys.readouterr().err
