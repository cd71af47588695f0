"""Documents as users have them: PDFs written by a real PDF writer (text drawn into the page), multi-page PDFs and
TIFFs, encrypted, truncated, huge and oversized files; the CLI and the server over them."""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image, ImageDraw

from fovea import VLM, save_model
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.preprocess.document import document_messages, open_document, parse_pages

TOTALS = ["1,250.00", "73.10", "9,904.55"]


def _pdf(pages: int = 3, size_in: tuple[float, float] = (8.5, 11.0)) -> bytes:
    """A PDF drawn with reportlab: on page N, a heading and the line "Total due: <TOTALS[N]>" as PDF text."""
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=(size_in[0] * 72, size_in[1] * 72))
    for n in range(pages):
        c.setFont("Helvetica-Bold", 28)
        c.drawString(72, size_in[1] * 72 - 96, f"INVOICE page {n + 1}")
        c.setFont("Helvetica", 18)
        c.drawString(72, size_in[1] * 72 - 160, f"Total due: {TOTALS[n % len(TOTALS)]} EUR")
        c.showPage()
    c.save()
    return buf.getvalue()


def _encrypted(data: bytes) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(data)).pages:
        writer.add_page(page)
    writer.encrypt(user_password="secret", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _tiff(frames: int = 2) -> bytes:
    """A scanner-style multi-frame TIFF (grey paper, dark text, CCITT-free LZW)."""
    images = []
    for n in range(frames):
        page = Image.new("L", (620, 800), 235)
        ImageDraw.Draw(page).text((40, 60), f"Scanned page {n + 1}: total {TOTALS[n]}", fill=20)
        images.append(page.copy())
    buf = io.BytesIO()
    images[0].save(buf, format="TIFF", save_all=True, append_images=images[1:], compression="tiff_lzw")
    return buf.getvalue()


# ----- opening ----------------------------------------------------------------------------------------------------
def test_pdf_pages_render_at_the_encoder_side_with_their_text():
    doc = open_document(_pdf(3), target_side=1100, name="invoice.pdf")
    assert (doc.kind, doc.total_pages, doc.numbers) == ("pdf", 3, [1, 2, 3])
    for page in doc.pages:
        assert max(page.size) == 1100 and page.size == (850, 1100)  # letter at 100 DPI: no upscaling later
        dark = int((np.asarray(page.convert("L")) < 128).sum())
        assert dark > 500  # the drawn text is there
    assert doc.pages[0].tobytes() != doc.pages[1].tobytes()  # each page is its own
    selected = open_document(_pdf(3), pages="3,1", target_side=1100)
    assert selected.numbers == [3, 1] and selected.pages[0].tobytes() == doc.pages[2].tobytes()


def test_tiff_frames_are_pages():
    doc = open_document(_tiff(2))
    assert (doc.kind, doc.numbers, [p.size for p in doc.pages]) == ("tiff", [1, 2], [(620, 800)] * 2)
    assert doc.pages[0].mode == "RGB" and doc.pages[0].tobytes() != doc.pages[1].tobytes()
    assert open_document(_tiff(2), pages="2").numbers == [2]


def test_page_selection():
    assert parse_pages("1-3,7", 9) == [1, 2, 3, 7]
    assert parse_pages(None, 2) == [1, 2] and parse_pages("2,2,1", 3) == [2, 1]
    with pytest.raises(ValueError, match="page 9 is out of range, the document has 3 pages"):
        parse_pages("1,9", 3)
    for bad in ("0", "3-1", "x", "1-"):
        with pytest.raises(ValueError, match="page selection"):
            parse_pages(bad, 5)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: _encrypted(_pdf(1)), "is encrypted"),
    (lambda: _pdf(2)[: len(_pdf(2)) // 2], "corrupt or truncated"),
    (lambda: b"%PDF-1.7\n%%EOF", "corrupt or truncated"),
    (lambda: _tiff(2)[:300], "corrupt or truncated"),
    (lambda: b"", "is empty"),
])
def test_bad_documents_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        open_document(make(), name="contract.pdf")


def test_limits_are_checked_before_rendering():
    with pytest.raises(ValueError, match="500 pages selected, the limit is 16 pages"):
        open_document(_pdf(500), max_pages=16)
    # A 100x100 inch poster at 200 DPI is 20,000 px a side: refused from its page box, before any rendering.
    with pytest.raises(ValueError, match=r"page 1: image of 20000x20000 = 400,000,000 pixels exceeds the limit"):
        open_document(_pdf(1, size_in=(100, 100)), dpi=200)
    with pytest.raises(ValueError, match="does not exist"):
        open_document("/no/such/contract.pdf")


def test_messages_mark_each_page():
    doc = open_document(_pdf(2), pages="2,1", target_side=256)
    content = document_messages(doc, "What is the total?")[0]["content"]
    assert content == [{"type": "text", "text": "Page 2:"}, {"type": "image"}, {"type": "text", "text": "Page 1:"},
                       {"type": "image"}, {"type": "text", "text": "What is the total?"}]


# ----- the engine: one encode per page, reused -------------------------------------------------------------------
def _model() -> VLM:
    torch.manual_seed(0)
    return VLM.from_config(tiny_config("fastvithd", "qformer", budget=8)).eval()


def test_every_page_gets_its_budget_and_a_second_question_encodes_nothing():
    model = _model()
    engine = Engine(model, EngineConfig(max_batch=2, max_len=512))
    doc = open_document(_pdf(3), target_side=256)
    first = engine.add_request(document_messages(doc, "What is the total?"), doc.pages, SamplingParams(max_tokens=3))
    engine.run_until_done()
    second = engine.add_request(document_messages(doc, "Who is the client?"), doc.pages, SamplingParams(max_tokens=3))
    engine.run_until_done()
    assert first.metrics.visual_tokens == 3 * 8  # the connector's budget per page
    assert first.metrics.encoder_cache_hits == 0 and second.metrics.encoder_cache_hits == 3
    assert second.metrics.encode_ms == 0
    assert second.metrics.cached_tokens > 3 * 8  # the pages' prefill came from the prefix cache


# ----- the CLI ------------------------------------------------------------------------------------------------------
def _ask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fovea.cli", "ask", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_bad_documents_before_loading_torch(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(_pdf(3))
    (tmp_path / "locked.pdf").write_bytes(_encrypted(_pdf(1)))
    for args, message in ((["doc.pdf", "q", "--pages", "9"], "page 9 is out of range"),
                          (["locked.pdf", "q"], "is encrypted"),
                          (["doc.pdf", "q", "--max-pages", "2"], "3 pages selected, the limit is 2")):
        code = ("import sys; from fovea.cli import main; rc = main(['ask', *sys.argv[1:]]); "
                "print(rc, 'torch' in sys.modules)")
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert run.stdout.split() == ["2", "False"], run.stdout + run.stderr
        assert message in run.stderr


def test_cli_answers_over_a_pdf(tmp_path):
    torch.manual_seed(0)
    save_model(VLM.from_config(tiny_config("fastvithd", "qformer", budget=8)), tmp_path / "model")
    (tmp_path / "doc.pdf").write_bytes(_pdf(2))
    out = _ask(str(tmp_path / "doc.pdf"), "What is the total?", "--model", str(tmp_path / "model"),
               "--max-tokens", "3", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "[16 visual /" in out.stderr and "2 pages: 8 visual tokens" in out.stderr


# ----- the server -------------------------------------------------------------------------------------------------
def _pdf_part(data: bytes, name: str = "contract.pdf") -> dict:
    return {"type": "file", "file": {"file_data": "data:application/pdf;base64," + base64.b64encode(data).decode(),
                                     "filename": name}}


@pytest.fixture(scope="module")
def served():
    from test_server import _serve

    from fovea.serve import create_app
    from fovea.serve.limits import ServerLimits

    model = _model()
    model.config.preprocess.max_side = 256
    engine = Engine(model, EngineConfig(max_batch=4, max_len=512))
    engine.start()
    server, thread, url = _serve(create_app(engine, model_name="tiny", limits=ServerLimits(max_pages=4)))
    yield engine, url
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def test_server_reads_pdf_file_parts_and_tiff_data_uris(served):
    import openai

    engine, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    pdf = _pdf(3)
    ask = [{"role": "user", "content": [_pdf_part(pdf), {"type": "text", "text": "What is the total?"}]}]
    first = client.chat.completions.create(model="tiny", messages=ask, max_tokens=3)
    again = client.chat.completions.create(model="tiny", messages=ask, max_tokens=3)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage.prompt_tokens > 3 * 8
    assert again.usage.prompt_tokens_details.cached_tokens > 3 * 8  # the same pages: their prefill is reused
    tiff = "data:image/tiff;base64," + base64.b64encode(_tiff(2)).decode()
    scan = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": tiff}}, {"type": "text", "text": "Read page 2."}]}])
    assert scan.usage.prompt_tokens > 2 * 8


@pytest.mark.parametrize(("part", "message"), [
    (lambda: _pdf_part(_pdf(5)), "5 pages selected, the limit is 4"),
    (lambda: _pdf_part(_encrypted(_pdf(1))), "is encrypted"),
    (lambda: _pdf_part(_pdf(2)[:900]), "corrupt or truncated"),
    (lambda: {"type": "file", "file": {"file_id": "file-123"}}, "file_id is not supported"),
])
def test_server_refuses_bad_documents_with_400_and_keeps_serving(served, part, message):
    import httpx

    engine, url = served
    body = {"model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": [part(), {"type": "text", "text": "q"}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    ok = httpx.post(url + "/v1/chat/completions", timeout=60, json={**body, "messages": [
        {"role": "user", "content": [_pdf_part(_pdf(1)), {"type": "text", "text": "q"}]}]})
    assert ok.status_code == 200


# ----- training data ----------------------------------------------------------------------------------------------
def test_synth_writes_pdf_documents_that_training_reads(tmp_path):
    """`fovea synth --pdf-pages 2`: PDFs whose records point at their pages (doc.pdf#page=N); the answer sits on
    one page and every question shows the whole document."""
    import json

    from fovea.data.records import encode_record, read_records
    from fovea.data.synth import write_dataset

    write_dataset(tmp_path, num_pages=3, size=(320, 240), questions_per_page=1, pdf_pages=2, seed=4)
    raw = json.loads((tmp_path / "data.json").read_text())
    assert {tuple(r["image"]) for r in raw} == {("docs/doc-000000.pdf#page=1", "docs/doc-000000.pdf#page=2"),
                                                ("docs/doc-000002.pdf#page=1",)}
    assert {r["id"].split("-p")[1][0] for r in raw} == {"1", "2"}  # answers on either page
    model = _model()
    model.config.preprocess.max_side = 320
    processor = model.processor()
    for record in read_records(tmp_path / "data.json"):
        sample = encode_record(record, processor)
        assert len(sample.images) == len(record.images) and sample.images[0].shape[-1] == 320
    bad = read_records(tmp_path / "data.json")[0]
    bad.images = [bad.images[0].split("#")[0]]  # a PDF without a page
    with pytest.raises(ValueError, match="name one page"):
        encode_record(bad, processor)


def test_attention_endpoint_maps_every_page(served):
    import httpx

    engine, url = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        _pdf_part(_pdf(2)), {"type": "text", "text": "What is the total?"}]}]}
    engine.clear_caches()
    r = httpx.post(url + "/v1/fovea/attention", json=body, timeout=60)
    assert r.status_code == 200, r.text
    chat = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60).json()
    assert chat["fovea_metrics"]["encoder_cache_hits"] == 2  # the pages the attention route encoded, reused
    images = r.json()["images"]
    assert len(images) == 2 and all(m["applies"] for m in images)
    for m in images:
        grid = (m["grid"]["height"], m["grid"]["width"])
        assert grid == engine.model.encoder.grid(m["input"]["height"], m["input"]["width"])
        assert len(m["weights"]) == grid[0] and abs(sum(map(sum, m["weights"])) - 1) < 1e-3
    bad = httpx.post(url + "/v1/fovea/attention", json={**body, "messages": [{"role": "user", "content": [
        _pdf_part(_encrypted(_pdf(1))), {"type": "text", "text": "q"}]}]}, timeout=60)
    assert bad.status_code == 400 and "encrypted" in bad.json()["error"]["message"]


def test_pages_preview_renders_what_the_model_reads_within_the_limits(served):
    """``/v1/fovea/pages`` (what the web page shows for a PDF or TIFF): one JPEG per page at the model's side with
    the page's aspect ratio; the chat route's page limit, and its 400, apply."""
    _, url = served
    uri = _pdf_part(_pdf(3))["file"]["file_data"]
    found = httpx.post(url + "/v1/fovea/pages", json={"file_data": uri, "filename": "c.pdf"}, timeout=60).json()
    assert [p["page"] for p in found["pages"]] == [1, 2, 3]
    for p in found["pages"]:
        assert max(p["width"], p["height"]) == 256 and abs(p["width"] / p["height"] - 8.5 / 11) < 0.01
        image = Image.open(io.BytesIO(base64.b64decode(p["image"].split(",", 1)[1])))
        assert image.format == "JPEG" and image.size == (p["width"], p["height"])
    over = httpx.post(url + "/v1/fovea/pages", json={"file_data": _pdf_part(_pdf(5))["file"]["file_data"]}, timeout=60)
    assert over.status_code == 400 and "5 pages selected, the limit is 4" in over.json()["error"]["message"]
    junk = httpx.post(url + "/v1/fovea/pages", json={"file_data": "data:application/pdf;base64,JVBERi0x"}, timeout=60)
    assert junk.status_code == 400
    info = httpx.get(url + "/v1/fovea/info", timeout=30).json()
    assert info["limits"]["max_pages"] == 4 and info["max_side"] == 256 and info["model"] == "tiny"
