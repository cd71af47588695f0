"""The hostile-client table replayed against a live server under honest load: every attack gets the answer a
correct server gives, no accepted request is lost, and the server keeps serving with bounded memory."""

from __future__ import annotations

import time

import pytest
import torch
from test_server import _model, _serve

from fovea.bench.faults import run_fault_check
from fovea.engine import Engine, EngineConfig
from fovea.serve import ServerLimits, create_app


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    engine = Engine(_model(), EngineConfig(max_batch=8, max_len=512, max_waiting=24))
    engine.eos_ids = set()
    engine.start()
    limits = ServerLimits(max_body_mb=1.0, max_images=3, read_timeout_s=1.0)
    uv, thread, url = _serve(create_app(engine, model_name="tiny-fovea", api_key="k", limits=limits))
    yield url, engine, limits
    uv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def test_attacks_under_load_lose_nothing(server):
    url, engine, limits = server
    report = run_fault_check(url, api_key="k", honest=24, burst=60, abandoned=4, half_sent=6,
                             max_body_bytes=limits.max_body_bytes, max_images=limits.max_images,
                             max_prompt_chars=512 * 16, progress=lambda s: None)
    bad = {name: c for name, c in report["cases"].items() if not c["ok"]}
    assert not bad, bad
    assert report["half_sent"]["ok"], report["half_sent"]
    assert report["honest"]["lost"] == 0 and report["honest"]["answered"] > 0
    assert report["burst"]["lost"] == 0 and report["burst"]["refused_429"] > 0  # the queue bound was reached
    assert report["still_serving"] and report["ok"]
    assert report["rss_mb"]["after"] - report["rss_mb"]["before"] < 1500  # the bombs were never decoded
    # Abandoned requests free their slots: the last answer can reach the client a moment before the engine thread
    # retires its finished request, so allow the engine 5 s to settle (a leak never settles).
    deadline = time.monotonic() + 5
    while (engine.running or engine.queue_depth()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running and engine.queue_depth() == 0
