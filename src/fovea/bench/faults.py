"""`fovea bench faults`: replay the hostile-client table against a running server while honest clients load it.

Every case states the answer a correct server gives (status code, or a freed slot); the honest requests must all
be answered (200) or refused up front (429 with Retry-After): an accepted request is never lost. The report has
each case's outcome, the honest requests' latency percentiles and the server's memory before and after.
"""

from __future__ import annotations

import base64
import io
import socket
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from fovea.log import say


def _png(size: tuple[int, int], flat: bool = True) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, "white") if flat else Image.effect_noise(size, 60).convert("RGB")
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def hostile_cases(max_body_bytes: int, max_images: int, max_prompt_chars: int) -> list[tuple[str, Any, set[int]]]:
    """(name, JSON body or raw bytes, acceptable statuses) for each attack; sized from the server's limits."""
    ok_text = [{"role": "user", "content": "hi"}]
    return [
        ("malformed JSON", b"{not json", {400}),
        ("deeply nested JSON", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", {400}),
        ("unknown parameter", {"messages": ok_text, "frobnicate": 1}, {400}),
        ("huge max_tokens string", {"messages": ok_text, "max_tokens": "9" * 200_000}, {400, 413}),
        ("seed overflow", {"messages": ok_text, "seed": 2**80}, {400}),
        ("NUL in text", {"messages": [{"role": "user", "content": "a\x00b"}]}, {400}),
        ("remote image URL", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]}, {400}),
        ("path traversal", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]}]}, {400}),
        ("not an image", {"messages": [{"role": "user", "content": [_image_part(b"GIF89a not really")]}]}, {400}),
        ("too many images", {"messages": [{"role": "user", "content": [_image_part(_png((32, 32)))] *
                                           (max_images + 1)}]}, {400}),
        ("decompression bomb", {"messages": [{"role": "user", "content": [_image_part(_png((5000, 5000)))]}]},
         {400, 413}),
        ("over-long prompt", {"messages": [{"role": "user", "content": "word " * (max_prompt_chars // 4)}]},
         {400, 413}),
        ("oversized body", b'{"messages": [{"role": "user", "content": "' + b"x" * (max_body_bytes + 1024) + b'"}]}',
         {413}),
    ]


def _post(url: str, body: Any, headers: dict, timeout: float) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={**headers, "content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(url, json=body, headers=headers, timeout=timeout)


def _half_sent(base: str, headers: dict, timeout: float) -> int | None:
    """A request whose body never finishes: the status the server answers with, or None if it never does."""
    host, port = base.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{head}Content-Type: application/json\r\n"
                  "Content-Length: 4000\r\n\r\n{\"messages\"".encode())
        try:
            reply = s.recv(1024).decode(errors="replace")
        except TimeoutError:
            return None
    return int(reply.split()[1]) if reply.startswith("HTTP/") else None


def _rss_mb(pid: int | None) -> float | None:
    try:
        status = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    return next(int(x.split()[1]) / 1024 for x in status.splitlines() if x.startswith("VmRSS:"))


def run_fault_check(base: str, *, api_key: str | None = None, honest: int = 64, burst: int = 200,
                    abandoned: int = 8, half_sent: int = 20, max_tokens: int = 8, max_body_bytes: int = 2**20,
                    max_images: int = 8, max_prompt_chars: int = 40_000, server_pid: int | None = None,
                    timeout: float = 300.0, progress: Callable[[str], None] = say) -> dict[str, Any]:
    """Replay the attacks while ``honest`` clients ask real questions, then a ``burst`` beyond the queue."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    chat = base + "/v1/chat/completions"
    page = _image_part(_png((320, 240), flat=False))
    good = {"messages": [{"role": "user", "content": [page, {"type": "text", "text": "What is the total?"}]}],
            "max_tokens": max_tokens}
    rss_before = _rss_mb(server_pid)
    latencies: list[float] = []
    outcomes: dict[str, list[int]] = {}
    lock = threading.Lock()

    def honest_request(_: int) -> int:
        start = time.perf_counter()
        r = _post(chat, good, headers, timeout)
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] >= 1
            with lock:
                latencies.append(time.perf_counter() - start)
        elif r.status_code == 429:
            assert "retry-after" in r.headers
        return r.status_code

    def attack(case) -> None:
        name, body, _ = case
        status = _post(chat, body, headers, timeout).status_code
        with lock:
            outcomes.setdefault(name, []).append(status)

    def abandon(_: int) -> None:
        try:
            _post(chat, {**good, "max_tokens": 400}, headers, timeout=0.3)
        except httpx.TimeoutException:
            pass

    cases = hostile_cases(max_body_bytes, max_images, max_prompt_chars)
    progress(f"[faults] {honest} honest clients, {len(cases)} attacks, {abandoned} abandoned and {half_sent} "
             "half-sent requests at once ...")
    with ThreadPoolExecutor(max_workers=honest + len(cases) + abandoned + half_sent) as pool:
        honest_jobs = [pool.submit(honest_request, i) for i in range(honest)]
        attack_jobs = [pool.submit(attack, c) for c in cases]
        abandon_jobs = [pool.submit(abandon, i) for i in range(abandoned)]
        half_jobs = [pool.submit(_half_sent, base, headers, 120) for _ in range(half_sent)]
        honest_status = [j.result() for j in honest_jobs]
        for j in attack_jobs + abandon_jobs:
            j.result()
        half_status = [j.result() for j in half_jobs]
    progress(f"[faults] burst of {burst} ...")
    with ThreadPoolExecutor(max_workers=burst) as pool:
        burst_status = list(pool.map(honest_request, range(burst)))
    after = _post(chat, good, headers, timeout).status_code  # the server still serves
    rss_after = _rss_mb(server_pid)
    return _report(cases, outcomes, half_status, honest_status, burst_status, after == 200, latencies,
                   {"before": rss_before, "after": rss_after})


def _report(cases, outcomes: dict[str, list[int]], half_status: list[int], honest_status: list[int],
            burst_status: list[int], still_serving: bool, latencies: list[float], rss: dict) -> dict[str, Any]:
    """What each attack got against what it should get, and whether any honest request was lost."""
    expected = {name: ok for name, _, ok in cases}
    report = {
        "cases": {name: {"statuses": statuses, "expected": sorted(expected[name]),
                         "ok": all(s in expected[name] for s in statuses)} for name, statuses in outcomes.items()},
        "half_sent": {"statuses": half_status, "ok": all(s == 408 for s in half_status)},
        "honest": {"answered": honest_status.count(200), "refused_429": honest_status.count(429),
                   "lost": sum(s not in (200, 429) for s in honest_status)},
        "burst": {"answered": burst_status.count(200), "refused_429": burst_status.count(429),
                  "lost": sum(s not in (200, 429) for s in burst_status)},
        "still_serving": still_serving,
        "latency_s": _percentiles(latencies),
        "rss_mb": rss,
    }
    report["ok"] = (all(c["ok"] for c in report["cases"].values()) and report["half_sent"]["ok"]
                    and report["honest"]["lost"] == 0 and report["burst"]["lost"] == 0 and report["still_serving"])
    return report


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(ordered), "n": len(ordered)}


def run_faults_bench(*, llm: str = "smollm2-135m-shape", honest: int = 64, burst: int = 200, max_batch: int = 16,
                     max_waiting: int = 64, threads: int | None = None, out_dir: str | Path = "bench-results",
                     progress: Callable[[str], None] = say) -> dict[str, Any]:
    """Start fovea's server on loopback (the serve benchmark's model, an API key, default limits) and replay the
    fault table against it at full scale; JSON + PNG."""
    from fovea.bench.common import environment, save_results
    from fovea.bench.serve import build_bench_model
    from fovea.engine import Engine, EngineConfig
    from fovea.runtime import placement
    from fovea.serve import ServerLimits, create_app
    from fovea.serve.loopback import LoopbackServer

    place = placement("auto", "auto", threads)
    model = build_bench_model(llm, 512).place(place.device, place.dtype)
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_len=1024, max_waiting=max_waiting))
    engine.start()
    limits = ServerLimits()
    key = "fault-check"
    try:
        with LoopbackServer(create_app(engine, api_key=key, limits=limits)) as url:
            report = run_fault_check(url, api_key=key, honest=honest, burst=burst,
                                     max_body_bytes=limits.max_body_bytes, max_images=limits.max_images,
                                     max_prompt_chars=1024 * 16, progress=progress)
    finally:
        engine.stop()
    payload = {"benchmark": "faults", "env": environment(), "llm": llm, "report": report,
               "command": f"fovea bench faults --honest {honest} --burst {burst}"}
    return save_results(payload, out_dir, "faults", chart, progress)


def chart(payload: dict[str, Any], path: Path) -> None:
    from fovea.plotting import pyplot, save_figure

    plt = pyplot()
    report = payload["report"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(report["cases"]) + ["half-sent body"]
    oks = [c["ok"] for c in report["cases"].values()] + [report["half_sent"]["ok"]]
    ax1.barh(names, [1] * len(names), color=["tab:green" if ok else "tab:red" for ok in oks])
    ax1.set(title="hostile requests: answered as expected (green)", xticks=[])
    lat = report["latency_s"]
    if lat:
        ax2.bar(["p50", "p90", "p99"], [lat["p50"], lat["p90"], lat["p99"]])
    ax2.set(ylabel="seconds", title=f"honest requests under attack: {report['honest']['answered']} answered, "
            f"{report['honest']['lost']} lost")
    save_figure(fig, path)
