"""Reading a corpus: each document's pages are encoded once and every question about it shares that encode and its
prefill (fovea's engine), on this process or on a pool of Ray Data actors, each holding one model.

Output: one JSON line per (document, field), written as each document finishes, so a killed run loses at most
the documents in flight; a re-run skips every document already in the output, and a document that fails (corrupt,
encrypted, too many pages) is recorded with its error and does not stop the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fovea.batch.inputs import Questions
from fovea.log import say


class DocumentReader:
    """One model and engine; answers every question of the schema about each document it is given. A Ray Data
    actor (``__call__`` on a batch of {"path": [...]}) or a plain object in this process."""

    def __init__(self, model: str | None, questions: Questions, *, llm: str | None = None, device: str = "auto",
                 dtype: str = "auto", threads: int | None = None, max_batch: int = 16) -> None:
        from fovea.engine import Engine, EngineConfig
        from fovea.loading import load_vlm

        self.questions = questions
        self.vlm = load_vlm(model, llm=llm, device=device, dtype=dtype, threads=threads, progress=lambda s: None)
        self.model_id = model or "fastvithd-qformer-64"
        self.engine = Engine(self.vlm, EngineConfig(max_batch=max(max_batch, len(questions.fields)), max_len=4096))

    def read(self, path: str) -> list[dict[str, Any]]:
        """The rows of one document: a row per field, or one row with the error."""
        from fovea.engine import SamplingParams
        from fovea.preprocess.document import document_messages, open_document

        start = time.perf_counter()
        base = {"document": path, "model": self.model_id}
        try:
            document = open_document(path, pages=self.questions.pages, max_pages=self.questions.max_pages,
                                     target_side=self.vlm.config.preprocess.max_side)
            params = SamplingParams(max_tokens=self.questions.max_tokens, seed=0)
            requests = [(document_messages(document, q), document.pages, params)
                        for q in self.questions.fields.values()]
            results = self.engine.generate(requests)
        except ValueError as err:
            return [{**base, "pages": None, "field": None, "answer": None, "error": str(err),
                     "seconds": time.perf_counter() - start}]
        rows = []
        for name, result in zip(self.questions.fields, results, strict=True):
            m = result["metrics"]
            rows.append({**base, "pages": document.numbers, "field": name, "answer": result["text"].strip(),
                         "error": None, "visual_tokens": m.visual_tokens, "prompt_tokens": m.prompt_tokens,
                         "cached_tokens": m.cached_tokens, "encode_ms": m.encode_ms, "prefill_ms": m.prefill_ms,
                         "ttft_ms": m.ttft_ms, "seconds": time.perf_counter() - start})
        return rows

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [row for path in batch["path"] for row in self.read(str(path))]
        return {"row": [json.dumps(row) for row in rows]}


def done_documents(out: Path) -> set[str]:
    """Documents already in the output (answered or failed). A last line cut by a kill is dropped from the file."""
    if not out.is_file():
        return set()
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):  # half a line: the process died mid-write
        lines = lines[:-1]
        out.write_text("".join(lines))
    done = set()
    for line in lines:
        try:
            done.add(json.loads(line)["document"])
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def run_batch(documents: list[str], questions: Questions, out: str | Path, *, model: str | None = None,
              llm: str | None = None, workers: int = 1, use_ray: bool = True, address: str | None = None,
              gpus_per_worker: float = 0.0, threads_per_worker: int | None = None, device: str = "auto",
              dtype: str = "auto", progress: Callable[[str], None] = say, show_bar: bool = True) -> dict[str, Any]:
    """Read every document not yet in ``out`` (JSONL, appended); returns counts and the documents/hour rate."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_documents(out)
    todo = [d for d in documents if d not in done]
    progress(f"fovea batch: {len(documents)} documents, {len(done)} already in {out}, {len(todo)} to read, "
             f"{len(questions.fields)} questions each, {workers} worker(s){' on Ray' if use_ray else ''}")
    stats = {"documents": len(documents), "skipped": len(done), "read": 0, "failed": 0, "rows": 0}
    start = time.perf_counter()
    if todo:
        rows = (_ray_rows(todo, questions, model, llm, workers, address, gpus_per_worker, threads_per_worker,
                          device, dtype) if use_ray else
                _local_rows(todo, questions, model, llm, threads_per_worker, device, dtype))
        _write(rows, out, stats, len(todo), show_bar)
    stats["seconds"] = time.perf_counter() - start
    stats["documents_per_hour"] = 3600 * stats["read"] / stats["seconds"] if stats["read"] else 0.0
    return stats


def _write(rows: Iterator[list[dict]], out: Path, stats: dict, total: int, show_bar: bool) -> None:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with open(out, "a") as fh, tqdm(total=total, unit="doc", desc="fovea batch", disable=not show_bar) as bar:
        for document_rows in rows:
            # One write per document, flushed and synced: a kill never leaves a document half-recorded.
            fh.write("".join(json.dumps(r) + "\n" for r in document_rows))
            fh.flush()
            os.fsync(fh.fileno())
            stats["read"] += 1
            stats["failed"] += int(document_rows[0]["error"] is not None)
            stats["rows"] += len(document_rows)
            bar.update(1)
            bar.set_postfix(docs_per_hour=f"{3600 * stats['read'] / (time.perf_counter() - start):,.0f}")


def _local_rows(todo, questions, model, llm, threads, device, dtype) -> Iterator[list[dict]]:
    reader = DocumentReader(model, questions, llm=llm, device=device, dtype=dtype, threads=threads)
    for path in todo:
        yield reader.read(path)


def _ray_rows(todo, questions, model, llm, workers, address, gpus, threads, device, dtype) -> Iterator[list[dict]]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 **({} if address else {"num_cpus": max(workers, os.cpu_count() or 1),
                                        "object_store_memory": 256 * 2**20}))
    import logging

    ray.data.DataContext.get_current().enable_progress_bars = False  # fovea's own bar reports progress
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray")]:  # and Ray's INFO lines go
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cores = max(1, (os.cpu_count() or 1) // workers)
        dataset = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=len(todo))
        resources = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
        results = dataset.map_batches(
            DocumentReader, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), **resources,
            fn_constructor_kwargs={"model": model, "questions": questions, "llm": llm, "device": device,
                                   "dtype": dtype, "threads": threads or cores})
        pending: dict[str, list[dict]] = {}
        for item in results.iter_rows():
            row = json.loads(item["row"])
            pending.setdefault(row["document"], []).append(row)
            want = 1 if row["error"] is not None else len(questions.fields)
            if len(pending[row["document"]]) == want:
                yield pending.pop(row["document"])
    finally:
        if started:
            ray.shutdown()
