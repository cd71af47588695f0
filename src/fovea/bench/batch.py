"""`fovea bench batch`: documents per hour for `fovea batch` on 1 and 2 Ray workers, and for the same documents
sent to `fovea serve` (one engine, continuous batching) by a pool of clients, in one run on this machine.

Every mode reads the same rendered contract pages with the same questions and a cold cache (a fresh output file,
a fresh server); the model is the preset or directory given (random vision weights cost what trained ones do).
"""

from __future__ import annotations

import base64
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fovea.batch.inputs import Questions
from fovea.batch.runner import run_batch
from fovea.bench.common import describe, environment, save_results
from fovea.data.synth import render_contract
from fovea.log import say
from fovea.plotting import pyplot, save_figure

FIELDS = {"number": "What is the agreement number?", "client": "Who is the client?"}


def run_batch_bench(*, documents: int = 8, model: str | None = None, llm: str | None = None,
                    page_size: tuple[int, int] = (2880, 2160), workers: tuple[int, ...] = (1, 2),
                    clients: int = 4, out_dir: str | Path = "bench-results",
                    progress: Callable[[str], None] = say) -> dict[str, Any]:
    env = environment()
    questions = Questions(fields=dict(FIELDS), max_tokens=8)
    progress(f"[bench batch] {describe(env)}; {documents} documents of {page_size[0]}x{page_size[1]}, "
             f"{len(FIELDS)} questions each")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i in range(documents):
            render_contract(*page_size, seed=100 + i).image.save(folder / f"contract-{i:03d}.png")
        paths = sorted(str(p) for p in folder.iterdir())
        for n in workers:
            progress(f"[bench batch] fovea batch, {n} Ray worker(s) ...")
            stats = run_batch(paths, questions, Path(tmp) / f"out-{n}.jsonl", model=model, llm=llm, workers=n,
                              show_bar=False, progress=lambda s: None)
            rows.append({"mode": f"fovea batch, {n} Ray worker{'s' if n > 1 else ''}", "workers": n,
                         "seconds": stats["seconds"], "documents_per_hour": stats["documents_per_hour"]})
            progress(f"[bench batch]   {stats['documents_per_hour']:,.0f} documents/hour ({stats['seconds']:.0f} s, "
                     "model loading included)")
        progress(f"[bench batch] fovea serve, {clients} clients ...")
        rows.append(_serve_mode(paths, questions, model, llm, clients))
        progress(f"[bench batch]   {rows[-1]['documents_per_hour']:,.0f} documents/hour")
    payload = {"benchmark": "batch", "env": env, "documents": documents, "page": f"{page_size[0]}x{page_size[1]}",
               "model": model or "fastvithd-qformer-64", "rows": rows,
               "command": f"fovea bench batch --documents {documents}"}
    return save_results(payload, out_dir, "batch", chart, progress)


def _serve_mode(paths: list[str], questions: Questions, model: str | None, llm: str | None,
                clients: int) -> dict[str, Any]:
    """The same documents through the OpenAI-compatible server: model loading, then each document's questions
    sent by a pool of ``clients`` HTTP clients (the server's engine batches them)."""
    import httpx

    from fovea.engine import Engine, EngineConfig
    from fovea.loading import load_vlm
    from fovea.serve import create_app
    from fovea.serve.loopback import LoopbackServer

    start = time.perf_counter()
    engine = Engine(load_vlm(model, llm=llm, progress=lambda s: None), EngineConfig(max_len=4096))
    engine.start()
    with LoopbackServer(create_app(engine, model_name="fovea")) as base:
        def ask(path: str) -> None:
            uri = "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
            for question in questions.fields.values():
                body = {"model": "fovea", "max_tokens": questions.max_tokens, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]}]}
                httpx.post(base + "/v1/chat/completions", json=body, timeout=600).raise_for_status()

        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(ask, paths))
    engine.stop()
    seconds = time.perf_counter() - start
    return {"mode": f"fovea serve, {clients} clients", "workers": 1, "seconds": seconds,
            "documents_per_hour": 3600 * len(paths) / seconds}


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["mode"] for r in payload["rows"]], [r["documents_per_hour"] for r in payload["rows"]])
    ax.set(xlabel="documents per hour (model loading included)", title=f"{payload['documents']} pages of "
           f"{payload['page']}, {len(FIELDS)} questions each")
    save_figure(fig, path)


def format_table(payload: dict[str, Any]) -> str:
    lines = [f"{'mode':<32} {'seconds':>8} {'docs/hour':>10}"]
    lines += [f"{r['mode']:<32} {r['seconds']:>8.1f} {r['documents_per_hour']:>10,.0f}" for r in payload["rows"]]
    return "\n".join(lines)


