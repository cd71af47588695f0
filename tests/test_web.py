"""The web page at ``/`` in a real headless Chromium (Debian's, driven by Playwright), against a real server on
loopback: upload, streamed answers equal to the API's, the timing bar, the heat map equal to the attention endpoint,
the API key, server limits and errors. Screenshots go to ``test-artifacts/`` (or ``$FOVEA_TEST_ARTIFACTS``)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import tiny_config
from PIL import Image, ImageDraw

from fovea import VLM
from fovea.engine import Engine, EngineConfig
from fovea.serve import ServerLimits, create_app
from fovea.serve.loopback import LoopbackServer

pytestmark = pytest.mark.browser
KEY = "page-key-7"
WAIT_MS = 90_000  # a generous bound for one answer on a busy 2-core CI machine


def _expect():
    from playwright.sync_api import expect  # waits by polling the DOM, which the page's CSP allows (no eval)

    return expect


def _chromium() -> str:
    found = os.environ.get("FOVEA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "no Chromium found: apt-get install -y chromium (or set FOVEA_CHROMIUM to a Chromium binary)"
    if os.environ.get("FOVEA_REQUIRE_BROWSER"):  # CI installs it and sets this: a missing browser fails there
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        # Playwright cannot download its own browser here: it drives the system's
        chromium = p.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("FOVEA_TEST_ARTIFACTS", "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _served(connector: str, *, api_key: str | None, limits: ServerLimits | None = None, **kw):
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", connector, **kw)).eval()
    engine = Engine(model, EngineConfig(max_batch=4, max_len=512, max_waiting=16))
    engine.start()
    server = LoopbackServer(create_app(engine, model_name="tiny-fovea", api_key=api_key, limits=limits),
                            log_level="warning").start()
    return server, engine


@pytest.fixture(scope="module")
def with_queries():
    """An instruction-aware Q-Former behind an API key: the heat map applies."""
    server, engine = _served("qformer", api_key=KEY, instruction_aware=True)
    yield server.url, engine
    server.stop()
    engine.stop()


@pytest.fixture(scope="module")
def one_to_one():
    """A 1:1 MLP bridge, no key, at most 2 pages and 1 MB a request."""
    server, engine = _served("mlp", api_key=None, limits=ServerLimits(max_pages=2, max_body_mb=1.0))
    yield server.url, engine
    server.stop()
    engine.stop()


def _page_png(path: Path) -> bytes:
    """A small page with text on it, as a user would drop one."""
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(["INVOICE 2041", "Date: 2026-11-02", "Total due: $1,204.50", "Pay within 30 days"]):
        draw.text((20, 20 + 40 * i), line, fill="black")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _pdf(path: Path, pages: int) -> None:
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    pdf = canvas.Canvas(buf, pagesize=(300, 400))
    for n in range(1, pages + 1):
        pdf.drawString(40, 350, f"Page {n} of a lease")
        pdf.drawString(40, 320, f"Rent due on day {n + 2}")
        pdf.showPage()
    pdf.save()
    path.write_bytes(buf.getvalue())


def _messages(png: bytes, question: str) -> list[dict]:
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": question}]}]


def _ask(page, question: str, turn: int):
    page.fill("#question", question)
    page.click("#ask")
    answer = page.locator(".turn .a").nth(turn)
    _expect()(answer).to_have_attribute("data-done", "1", timeout=WAIT_MS)
    return answer


def _enter_key(page, key: str) -> None:
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.click("#key-save")


def test_ask_stream_time_and_look(with_queries, browser, artifacts, tmp_path):
    """The whole loop behind the API key: the streamed answer equals the API's answer to the same request, the
    timing bar and token count are the response's own, the heat map's hottest cell is the attention endpoint's,
    and a follow-up about the same page does not encode it again."""
    url, _ = with_queries
    png = _page_png(tmp_path / "invoice.png")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url + "/")
    _enter_key(page, KEY)  # the page asked for the key: every API route needs it
    _expect()(page.locator("#model-info")).to_contain_text("qformer")
    assert page.evaluate("sessionStorage.getItem('fovea-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0  # the key never goes to disk

    page.set_input_files("#file-input", str(tmp_path / "invoice.png"))
    page.wait_for_selector("img[data-testid=page-image]")
    page.fill("#max-tokens", "12")
    answer = _ask(page, "What is the total due?", 0)

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    reference = client.chat.completions.create(model="tiny-fovea", messages=_messages(png, "What is the total due?"),
                                               max_tokens=12, temperature=0)
    assert answer.text_content() == reference.choices[0].message.content
    assert reference.usage.completion_tokens > 1
    assert int(answer.get_attribute("data-chunks")) > 1  # it came in pieces, as it was generated

    cost = page.locator(".turn .cost").nth(0)
    summary = cost.locator(".summary")
    assert int(summary.get_attribute("data-visual-tokens")) == reference.usage.visual_tokens == 8
    assert float(summary.get_attribute("data-ttft-ms")) > 0
    bar = cost.locator("[data-testid=timing-bar]")
    stage_ms = {s: float(bar.locator(f".seg.{s}").get_attribute("data-ms"))
                for s in ("preprocess", "encode", "compress", "prefill", "decode")}
    assert all(v > 0 for v in stage_ms.values()), stage_ms

    _expect()(page.locator(".turn .looked").nth(0)).to_have_attribute("data-applies", "1", timeout=WAIT_MS)
    found = httpx.post(url + "/v1/fovea/attention", json={"messages": _messages(png, "What is the total due?")},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    weights = torch.tensor(found["images"][0]["weights"])
    peak_y, peak_x = divmod(int(weights.argmax()), weights.shape[1])
    heat = page.locator("#heat-0")
    assert heat.get_attribute("data-peak") == f"{peak_x},{peak_y}"
    painted = page.evaluate("""() => { const c = document.getElementById('heat-0');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n / (d.length / 4); }""")
    assert painted > 0.9  # every cell over the page is drawn
    page.screenshot(path=str(artifacts / "web-answer-and-heat-map.png"), full_page=True)

    follow = _ask(page, "When is it due?", 1)
    assert follow.text_content()
    second = page.locator(".turn .cost").nth(1)
    assert float(second.locator(".bar .seg.encode").get_attribute("data-ms")) == 0.0
    assert "encoder cache" in second.locator(".caches").text_content()
    page.screenshot(path=str(artifacts / "web-follow-up.png"), full_page=True)
    page.close()


def test_wrong_key_is_a_clear_message_and_the_right_one_works(with_queries, browser):
    url, _ = with_queries
    page = browser.new_page()
    page.goto(url + "/")
    _enter_key(page, "not-the-key")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.text_content("#error") and "API key" in page.text_content("#error")
    _enter_key(page, KEY)  # the dialog came back; the server kept serving
    page.wait_for_selector("#error", state="hidden")
    _expect()(page.locator("#model-info")).to_contain_text("tiny-fovea")
    page.close()


def test_pdf_pages_limits_and_a_bridge_without_queries(one_to_one, browser, artifacts, tmp_path):
    """No key needed; a PDF over the server's page limit is refused with the server's own message, one within it
    shows each page, is answered, and the heat map says it does not apply to a 1:1 bridge; a file too large for
    the request limit is stopped before it is sent."""
    url, _ = one_to_one
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url + "/")
    _expect()(page.locator("#model-info")).to_contain_text("mlp")
    assert not page.evaluate("document.getElementById('key-dialog').open")

    _pdf(tmp_path / "long.pdf", 3)
    page.set_input_files("#file-input", str(tmp_path / "long.pdf"))
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert "HTTP 400" in error and "3 pages selected, the limit is 2" in error
    assert page.is_disabled("#ask")

    _pdf(tmp_path / "lease.pdf", 2)
    page.set_input_files("#file-input", str(tmp_path / "lease.pdf"))
    _expect()(page.locator("img[data-testid=page-image]")).to_have_count(2)
    assert page.is_hidden("#error")
    page.fill("#max-tokens", "6")
    answer = _ask(page, "When is rent due?", 0)
    assert answer.text_content() and "failed" not in (answer.get_attribute("class") or "")
    _expect()(page.locator(".turn .looked").nth(0)).to_have_attribute("data-applies", "0", timeout=WAIT_MS)
    assert "does not apply" in page.text_content(".turn .looked")
    page.screenshot(path=str(artifacts / "web-pdf-one-to-one.png"), full_page=True)

    big = tmp_path / "scan.png"
    Image.frombytes("RGB", (700, 700), os.urandom(700 * 700 * 3)).save(big)  # noise: ~1.4 MB as PNG
    page.set_input_files("#file-input", str(big))
    page.wait_for_selector("#error:not([hidden])")
    assert "over this server's 1 MB request limit" in page.text_content("#error")
    assert page.locator("img[data-testid=page-image]").count() == 2  # the previous document is still there
    page.close()


def test_page_is_served_without_the_key_and_without_third_parties(with_queries):
    url, _ = with_queries
    html = httpx.get(url + "/", timeout=30)
    assert html.status_code == 200 and "text/html" in html.headers["content-type"]
    assert "default-src 'self'" in html.headers["content-security-policy"]
    for asset in ("/web/app.js", "/web/style.css"):
        body = httpx.get(url + asset, timeout=30).text
        assert "http://" not in body and "https://" not in body  # nothing from a CDN
    assert httpx.get(url + "/v1/fovea/info", timeout=30).status_code == 401
