"""The HTTP server over loopback, driven by the official openai client and by raw HTTP for bad input."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import tiny_config
from fastapi.testclient import TestClient
from PIL import Image

from fovea import VLM
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.serve import create_app
from fovea.serve.loopback import LoopbackServer


def _png(size=(160, 120), seed=1) -> bytes:
    buf = io.BytesIO()
    seeded = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=seeded)
    Image.fromarray(noise.numpy()).save(buf, format="PNG")  # the same seed, the same bytes: expected answers hold
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(question: str, image: bytes | None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_uri(image)}})
    return [{"role": "user", "content": content}]


QUESTIONS = [("What is the total?", 1), ("Who signed?", 2), ("Read clause 3.", None), ("Date?", 3)]


def _model() -> VLM:
    torch.manual_seed(0)
    model = VLM.from_config(tiny_config("fastvithd", "mlp"))
    model.config.preprocess.max_pixels = 600 * 600
    return model.eval()


def _serve(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    running = LoopbackServer(app, log_level="warning").start()
    return running.server, running.thread, running.url


@pytest.fixture(scope="module")
def live():
    model = _model()
    engine = Engine(model, EngineConfig(max_batch=8, max_len=512, max_waiting=128))
    expected = {}
    for question, seed in QUESTIONS:  # reference answers, computed by the engine directly before serving
        image = [Image.open(io.BytesIO(_png(seed=seed)))] if seed else []
        content = ([{"type": "image"}] if seed else []) + [{"type": "text", "text": question}]
        out = engine.generate([([{"role": "user", "content": content}], image, SamplingParams(max_tokens=8))])[0]
        expected[question] = out["text"]
    engine.start()
    server, thread, url = _serve(create_app(engine, model_name="tiny-fovea"))
    yield url, engine, expected
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_plain_and_streaming(live):
    url, _, expected = live
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["tiny-fovea"]
    for question, seed in QUESTIONS:
        image = _png(seed=seed) if seed else None
        reply = client.chat.completions.create(model="tiny-fovea", messages=_messages(question, image), max_tokens=8)
        assert reply.choices[0].message.content == expected[question]
        assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
        assert reply.usage.model_extra["visual_tokens"] == (12 if seed else 0)  # 160x120 -> 256x192 px, stride 64
        # the fixture ran this very prompt: all of it but the position that yields the first token is reused
        assert reply.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1
        chunks = list(client.chat.completions.create(model="tiny-fovea", messages=_messages(question, image),
                                                     max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected[question]
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_sse_ends_with_done(live):
    url, _, _ = live
    body = {"messages": _messages("hi", None), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and lines[0].startswith("data: {")


def test_64_concurrent_requests_all_answered(live):
    url, engine, expected = live
    client = _client(url)

    def ask(i: int):
        question, seed = QUESTIONS[i % len(QUESTIONS)]
        reply = client.chat.completions.create(messages=_messages(question, _png(seed=seed) if seed else None),
                                               model="tiny-fovea", max_tokens=8)
        return question, reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(ask, range(64)))
    assert len(answers) == 64
    assert all(text == expected[q] for q, text in answers)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    metrics = httpx.get(url + "/metrics").text
    assert "fovea_queue_depth 0" in metrics and 'fovea_ttft_seconds_bucket{le="+Inf"}' in metrics
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line and not line.startswith("#"))
    assert float(values["fovea_requests_total"]) >= 64 and float(values["fovea_ttft_seconds_count"]) >= 64
    assert float(values["fovea_cached_prompt_tokens_total"]) > 0  # the repeated prompts reused their prefixes
    assert float(values["fovea_prefix_cache_positions"]) > 0 and float(values["fovea_encoder_cache_images"]) > 0


BAD = [
    ("malformed JSON", b"{not json", 400, "malformed JSON"),
    ("no messages", {"max_tokens": 3}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, 400, "content is empty"),
    ("invalid base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64"}}]}]}, 400, "invalid base64"),
    ("not an image", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_uri(b"hello, not an image")}}]}]}, 400,
     "not a recognised image format"),
    ("too many pixels", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_uri(_png((700, 700)))}}]}]}, 400,
     "exceeds the limit of 360,000 pixels"),
    ("remote url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, "not fetched"),
    ("prompt over context", {"messages": [{"role": "user", "content": "x" * 600}]}, 400,
     "exceeds the context length of 512"),
    ("unknown parameter", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400,
     "unknown parameter 'frobnicate'"),
    ("temperature out of range", {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400,
     "temperature"),
    ("max_tokens zero", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("wrong model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-9"),
]


@pytest.mark.parametrize("name, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(live, name, body, status, message):
    url, _, expected = live
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(url + "/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = httpx.post(url + "/v1/chat/completions", json={"messages": _messages("Read clause 3.", None),
                                                        "max_tokens": 8}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected["Read clause 3."]


def test_client_disconnect_frees_its_slot(live):
    url, engine, _ = live
    engine_eos, engine.eos_ids = engine.eos_ids, set()
    try:
        body = {"messages": _messages("tell me everything", None), "max_tokens": 400, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": ""' not in line:
                    break  # got a real token, now hang up
        deadline = time.time() + 20
        while engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.running and len(engine.cache.free) == engine.config.max_batch
    finally:
        engine.eos_ids = engine_eos


def test_full_queue_is_429_with_retry_after_and_nothing_accepted_is_lost():
    engine = Engine(_model(), EngineConfig(max_batch=1, max_len=256, max_waiting=1))  # not started yet
    server, thread, url = _serve(create_app(engine, model_name="tiny-fovea", retry_after_s=2))
    try:
        results = {}

        def first():
            results["first"] = httpx.post(url + "/v1/chat/completions", timeout=60,
                                          json={"messages": _messages("hi", None), "max_tokens": 3})

        t = threading.Thread(target=first)
        t.start()
        deadline = time.time() + 20
        while engine.queue_depth() < 1 and time.time() < deadline:
            time.sleep(0.02)
        busy = httpx.post(url + "/v1/chat/completions", json={"messages": _messages("hi", None)}, timeout=60)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
        assert "server busy" in busy.json()["error"]["message"]
        engine.start()
        t.join(timeout=60)
        assert results["first"].status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


def test_api_key_and_local_files(tmp_path):
    engine = Engine(_model(), EngineConfig(max_batch=1, max_len=256))
    engine.start()
    (tmp_path / "page.png").write_bytes(_png())
    app = create_app(engine, api_key="s3cret", local_image_dir=str(tmp_path))
    try:
        with TestClient(app) as client:
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(tmp_path / "page.png")}},
                {"type": "text", "text": "hi"}]}], "max_tokens": 2}
            assert client.post("/v1/chat/completions", json=body).status_code == 401
            auth = {"Authorization": "Bearer s3cret"}
            assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
            outside = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}
            r = client.post("/v1/chat/completions", json=outside, headers=auth)
            assert r.status_code == 400 and "outside the allowed image directory" in r.json()["error"]["message"]
            assert client.get("/health").status_code == 200  # health needs no key
    finally:
        engine.stop()


# ----- limits and hardening ---------------------------------------------------------------------------------------
KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded():
    """A server with a key and small limits: 256 KB bodies, 2 images, 400k pixels per request, 0.5 s body stalls."""
    from fovea.serve import ServerLimits

    engine = Engine(_model(), EngineConfig(max_batch=4, max_len=512, max_waiting=32))
    engine.eos_ids = set()  # every answer runs to max_tokens: a long request stays long
    engine.start()
    limits = ServerLimits(max_body_mb=0.25, max_images=2, max_request_pixels=400_000, read_timeout_s=0.5)
    server, thread, url = _serve(create_app(engine, model_name="tiny-fovea", api_key=KEY, limits=limits))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def _idle(engine, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if not engine.running and engine.queue_depth() == 0:
            return True
        time.sleep(0.02)
    return False


def test_abandoned_non_streaming_requests_free_their_slots(guarded):
    """Clients that give up on non-streaming requests (behind the API key) free their slots within a second."""
    url, engine = guarded
    body = {"messages": _messages("tell me everything", None), "max_tokens": 440}

    def abandon(_):
        try:
            httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.4)
        except httpx.TimeoutException:
            return time.time()
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        left = list(pool.map(abandon, range(4)))
    assert all(t is not None for t in left), "a 440-token answer finished before its client gave up"
    assert _idle(engine, within=1.0), f"{len(engine.running)} abandoned requests still hold slots"


def test_body_over_the_limit_is_413_without_reading_it(guarded):
    url, _ = guarded
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'
    start = time.time()
    r = httpx.post(url + "/v1/chat/completions", content=big, headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and "exceeds the limit of 262,144 bytes" in r.json()["error"]["message"]
    assert time.time() - start < 5

    def chunks():  # no Content-Length: the guard counts while the body streams in
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 20_000
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_half_sent_body_gets_408(guarded):
    url, _ = guarded
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
        start = time.time()
        reply = s.recv(4096).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 408") and time.time() - start < 5


def test_prompt_beyond_any_fit_is_refused_before_tokenizing(guarded):
    url, _ = guarded
    start = time.time()
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"messages": [{"role": "user", "content": "word " * 40_000}]})
    assert r.status_code == 400 and "cannot fit the limit of 512 tokens" in r.json()["error"]["message"]
    assert time.time() - start < 2


def _flat_png(size) -> bytes:  # compresses to almost nothing: only the pixel limits can refuse it
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return buf.getvalue()


def test_images_and_pixels_per_request_are_bounded(guarded):
    url, _ = guarded
    part = {"type": "image_url", "image_url": {"url": _data_uri(_flat_png((200, 150)))}}
    three = {"messages": [{"role": "user", "content": [part, part, part, {"type": "text", "text": "hi"}]}]}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=three, timeout=30)
    assert r.status_code == 400 and "3 images; the limit is 2" in r.json()["error"]["message"]
    wide = {"type": "image_url", "image_url": {"url": _data_uri(_flat_png((580, 580)))}}  # 336,400 px each
    two = {"messages": [{"role": "user", "content": [wide, wide, {"type": "text", "text": "hi"}]}]}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=two, timeout=30)
    assert r.status_code == 400 and "limit is 400,000 per request" in r.json()["error"]["message"]


def test_errors_are_openai_shaped_short_and_name_the_field(guarded):
    url, _ = guarded
    huge = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9" * 100_000}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=huge, timeout=30)
    assert r.status_code == 400 and len(r.content) < 1000 and "100,002 characters" in r.json()["error"]["message"]
    nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(url + "/v1/chat/completions", content=nested, timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    seed = {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=seed, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("seed")
    nul = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\x00b"}]}]}
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=nul, timeout=30)
    assert r.status_code == 400 and "messages[0].content[0].text contains a NUL" in r.json()["error"]["message"]


def test_every_revealing_route_needs_the_key(guarded):
    url, _ = guarded
    for path in ("/metrics", "/v1/models"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + path, headers=AUTH).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + path, headers=AUTH).status_code == 404
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # liveness without the key, nothing more
    assert "waiting" in httpx.get(url + "/health", headers=AUTH).json()


def test_empty_key_is_refused_and_metrics_can_be_public():
    engine = Engine(_model(), EngineConfig(max_batch=1, max_len=256))
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(engine, api_key="")
    with TestClient(create_app(engine, api_key="k", public_metrics=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_attention_endpoint_says_when_it_does_not_apply(live):
    url, _, _ = live
    r = httpx.post(url + "/v1/fovea/attention", timeout=60, json={"messages": _messages("What is the total?", _png())})
    assert r.status_code == 200, r.text
    (image,) = r.json()["images"]
    assert image["applies"] is False and "no queries" in image["reason"]  # the live model's bridge is the MLP


def test_web_page_can_be_turned_off():
    """``create_app(web=False)`` (``fovea serve --no-web``): the API only, ``/`` is a 404 in the API's shape."""
    engine = Engine(_model(), EngineConfig(max_batch=2, max_len=256))
    with TestClient(create_app(engine, web=False)) as client:
        assert client.get("/").status_code == 404 and client.get("/web/app.js").status_code == 404
        assert client.get("/v1/fovea/info").json()["attention_applies"] is False  # a 1:1 MLP bridge
    with TestClient(create_app(engine)) as client:
        assert client.get("/").status_code == 200 and client.get("/web/app.js").status_code == 200
