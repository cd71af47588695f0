"""Stage evidence: targets laid out as documented, one page read once for many questions equals reading it per
question, the stage learns to transcribe (loss and held-out token accuracy), bad records are named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from fovea import VLM, save_model
from fovea.config import ConnectorConfig
from fovea.connectors import build_connector
from fovea.data.documents import KINDS, REFUSAL, render_document, write_documents
from fovea.data.records import Record
from fovea.lm import build_lm
from fovea.train.evidence import PAD_TEXT, evidence_targets, group_by_page, pad_id
from fovea.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    torch.manual_seed(0)
    cfg = tiny_config("fovea-reader", "qformer", budget=16, max_side=192, instruction_aware=True)
    save_model(VLM.from_config(cfg), root / "model")
    write_documents(root / "data", num_pages=2, seed=0, sizes=((384, 288),), questions_per_page=6, damage=0.0)
    return root


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_fact_carries_the_text_that_answers_it(kind):
    doc = render_document(kind, 7)
    assert doc.facts and doc.absent
    for fact in doc.facts:
        assert fact.answer in fact.evidence, (fact.key, fact.answer, fact.evidence)
    for fact in doc.absent:
        assert fact.answer == REFUSAL and fact.evidence == ""


def test_targets_are_evidence_then_padding_and_cut_at_the_budget():
    _, tokenizer = build_lm(tiny_config().lm)
    pad = pad_id(tokenizer)
    assert tokenizer.decode([pad]) == PAD_TEXT
    records = [Record(id=i, messages=[], meta={"evidence": text}) for i, text in
               enumerate(["Total due: $500.50", "", "word " * 40])]
    targets, cut = evidence_targets(records, tokenizer, 24)
    ids = tokenizer("Total due: $500.50", add_special_tokens=False)["input_ids"]
    assert len(ids) < 24 and targets[0].tolist() == ids + [pad] * (24 - len(ids))
    assert targets[1].tolist() == [pad] * 24
    assert len(targets[2]) == 24 and pad not in targets[2].tolist() and cut == 1
    with pytest.raises(ValueError, match="record 'x' has no 'evidence'"):
        evidence_targets([Record(id="x", messages=[], meta={})], tokenizer, 12)


def test_one_page_read_once_for_several_questions_equals_reading_it_per_question():
    torch.manual_seed(0)
    q = build_connector(ConnectorConfig(name="qformer", num_queries=8, hidden_size=32, num_heads=4, num_layers=3,
                                        cross_attention_every=1, instruction_aware=True), in_channels=16, out_dim=24)
    page, text = torch.randn(1, 16, 5, 7), torch.randn(3, 4, 24)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    once = q(page, text_embeds=text, text_mask=mask)  # (3,Q,D)
    each = q(page.expand(3, -1, -1, -1), text_embeds=text, text_mask=mask)
    torch.testing.assert_close(once, each, rtol=1e-5, atol=1e-6)
    once.sum().backward()  # the shared keys and values get gradients from every question
    assert q.layers[0].crossattention.key.weight.grad.abs().sum() > 0


def test_stage_evidence_learns_to_transcribe_and_writes_a_model(setup, tmp_path):
    data = setup / "data" / "data.json"
    cfg = TrainConfig(data=str(data), eval_data=str(data), model=str(setup / "model"), out=str(tmp_path / "run"),
                      stage="evidence", steps=40, batch_size=2, lr=3e-3, warmup_steps=0, eval_every=40,
                      save_every=20, eval_samples=64, threads=1)
    result = train(cfg, progress=False)
    assert result.losses[-1] < 0.6 * result.losses[0], result.losses[::10]
    assert result.evals[-1]["token_accuracy"] > 0.2, result.evals  # the same pages: read back, far above 1/V
    assert result.final is not None and (result.final / "config.json").is_file()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_pages_group_their_questions_and_records_without_evidence_are_named(setup, tmp_path):
    records = json.loads((setup / "data" / "data.json").read_text())
    for r in records:
        r.pop("evidence")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    for name in ("images",):
        (tmp_path / name).symlink_to(setup / "data" / name)
    cfg = TrainConfig(data=str(bad), model=str(setup / "model"), out=str(tmp_path / "run"), stage="evidence",
                      steps=1, batch_size=1, eval_fraction=0.0, threads=1)
    with pytest.raises(ValueError, match="has no 'evidence' text"):
        train(cfg, progress=False)

    class Page:
        features = torch.zeros(1)

    class Sample:
        def __init__(self, page):
            self.images, self.id = [page], 0

    a, b = Page(), Page()
    b.features = torch.zeros(1)
    assert group_by_page([Sample(a), Sample(b), Sample(a)]) == [[0, 2], [1]]
