"""`fovea bench serve`: throughput and TTFT percentiles at several concurrency levels, for fovea's engine and for
the same model driven by transformers ``generate`` one request at a time and as a padded (static) batch.

Every mode serves the same workload (the same requests, greedy, same max_tokens) with ``c`` clients that each send
their next request when the previous one is answered. Image preprocessing, encoding and compression happen inside
each mode's timed path. Throughput = completion tokens / wall time; TTFT = submission to first token.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from fovea.bench.common import describe, environment, save_results
from fovea.config import CLIP_MEAN, CLIP_STD, ConnectorConfig, LMConfig, PreprocessConfig, VisionConfig, VLMConfig
from fovea.data.synth import render_contract
from fovea.engine import Engine, EngineConfig, SamplingParams
from fovea.engine import stream as stream_events
from fovea.log import say
from fovea.model import VLM
from fovea.plotting import pyplot, save_figure
from fovea.runtime import dtype_name, placement

QUESTIONS = ["What is the agreement number?", "Who is the client?", "What is the governing law?",
             "Summarise clause 2 in one sentence, then list every amount that appears in the fee table.",
             "When does the agreement take effect?", "What is the total for support hours?"]


def workload(n: int, max_tokens: int, seed: int = 0, pages: int = 4) -> list[dict[str, Any]]:
    """``n`` requests over ``pages`` pages rendered with different seeds (request i asks about page i mod pages),
    questions of different lengths."""
    pages = [render_contract(640, 480, seed=seed + i).image for i in range(max(1, min(n, pages)))]
    return [{"messages": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}],
             "images": [pages[i % len(pages)]], "max_tokens": max_tokens - (i % 3) * (max_tokens // 4)}
            for i in range(n)]


class _FirstToken(BaseStreamer):
    """Records when ``generate`` emits its first new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _clients(requests: list[dict], concurrency: int, handle: Callable[[dict], tuple[float, int]]) -> dict:
    """Run ``requests`` with ``concurrency`` closed-loop clients; ``handle`` returns (ttft_s, completion tokens)."""
    todo: queue.Queue = queue.Queue()
    for r in requests:
        todo.put(r)
    ttfts, tokens, errors = [], [], []
    lock = threading.Lock()

    def client():
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            try:
                ttft, n = handle(r)
                with lock:
                    ttfts.append(ttft)
                    tokens.append(n)
            except Exception as err:  # recorded, never swallowed silently
                with lock:
                    errors.append(repr(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = sorted(ttfts)

    def pct(p: float) -> float:
        return q[min(len(q) - 1, int(round(p * (len(q) - 1))))] if q else float("nan")

    return {"wall_s": wall, "requests": len(ttfts), "errors": errors, "completion_tokens": sum(tokens),
            "throughput_tok_s": sum(tokens) / wall, "ttft_p50_s": pct(0.5), "ttft_p90_s": pct(0.9),
            "ttft_p99_s": pct(0.99), "ttft_mean_s": statistics.fmean(q) if q else float("nan")}


def _prepare(model: VLM, r: dict) -> torch.Tensor:
    prompt = model.processor()(r["messages"], r["images"])
    sizes = [p.original_size for p in prompt.images]
    visual = model.visual_tokens([p.pixels for p in prompt.images], image_sizes=sizes)
    return model.embed(prompt.input_ids.to(model.device), visual)  # (L,D)


def run_fovea(model: VLM, requests: list[dict], concurrency: int, max_len: int, caches: bool = False) -> dict:
    """fovea's engine; ``caches`` turns on its encoder cache and prefix cache (off: every image is encoded and
    every prompt position computed, as the transformers modes do)."""
    cache_sizes = {} if caches else {"encoder_cache": 0, "prefix_cache": 0}  # on: the engine's (and serve's) defaults
    engine = Engine(model, EngineConfig(max_batch=max(concurrency, 1), max_len=max_len, step_tokens=2048,
                                        max_waiting=len(requests), **cache_sizes))
    engine.eos_ids = set()  # every mode generates exactly max_tokens: equal work
    engine.start()
    try:
        def handle(r):
            submitted = time.perf_counter()
            req = engine.add_request(r["messages"], r["images"], SamplingParams(max_tokens=r["max_tokens"]))
            first = None
            for event in stream_events(req, timeout=600):
                if first is None and event.token_ids:
                    first = time.perf_counter()
            return first - submitted, len(req.tokens)

        return _clients(requests, concurrency, handle)
    finally:
        engine.stop()


def run_hf_one_at_a_time(model: VLM, reference_lm, requests: list[dict], concurrency: int) -> dict:
    busy = threading.Lock()  # a server that runs one request at a time

    def handle(r):
        submitted = time.perf_counter()
        with busy, torch.inference_mode():
            embeds = _prepare(model, r)
            streamer = _FirstToken()
            mask = torch.ones(1, len(embeds), dtype=torch.long, device=embeds.device)
            out = reference_lm.generate(inputs_embeds=embeds[None], attention_mask=mask, max_new_tokens=r["max_tokens"],
                                        min_new_tokens=r["max_tokens"], do_sample=False, streamer=streamer)
        return streamer.first - submitted, int(out.shape[1])

    return _clients(requests, concurrency, handle)


def run_hf_padded(model: VLM, reference_lm, requests: list[dict], concurrency: int) -> dict:
    """Static batching: whatever is waiting (up to ``concurrency``) is left-padded into one generate call; every
    request in it waits for the longest one."""
    inbox: queue.Queue = queue.Queue()
    stop = threading.Event()

    def server():
        while not stop.is_set():
            try:
                batch = [inbox.get(timeout=0.05)]
            except queue.Empty:
                continue
            time.sleep(0.01)  # let the other clients' requests arrive
            while len(batch) < concurrency:
                try:
                    batch.append(inbox.get_nowait())
                except queue.Empty:
                    break
            with torch.inference_mode():
                embeds = [_prepare(model, r) for r, _ in batch]
                longest = max(len(e) for e in embeds)
                dim = embeds[0].shape[1]
                padded = torch.zeros(len(batch), longest, dim, dtype=embeds[0].dtype,
                                     device=embeds[0].device)  # (B,Lmax,D), left padding
                mask = torch.zeros(len(batch), longest, dtype=torch.long, device=embeds[0].device)
                for i, e in enumerate(embeds):
                    padded[i, longest - len(e):], mask[i, longest - len(e):] = e, 1
                n = max(r["max_tokens"] for r, _ in batch)
                streamer = _FirstToken()
                reference_lm.generate(inputs_embeds=padded, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, streamer=streamer)
            for r, box in batch:
                box.put((streamer.first, r["max_tokens"]))

    thread = threading.Thread(target=server, daemon=True)
    thread.start()

    def handle(r):
        submitted = time.perf_counter()
        box: queue.Queue = queue.Queue()
        inbox.put((r, box))
        first, n = box.get(timeout=1200)
        return first - submitted, n  # a padded batch's shorter requests are cut to their own max_tokens

    try:
        return _clients(requests, concurrency, handle)
    finally:
        stop.set()
        thread.join(timeout=10)


def build_bench_model(llm: str, max_side: int) -> VLM:
    torch.manual_seed(0)
    config = VLMConfig(vision=VisionConfig(name="fastvit-mci0"), connector=ConnectorConfig(name="qformer",
                       num_queries=64), lm=LMConfig(name=llm),
                       preprocess=PreprocessConfig(max_side=max_side, upscale=True, mean=CLIP_MEAN, std=CLIP_STD))
    return VLM.from_config(config).eval().reparameterize_encoder()


def run_serve_bench(*, llm: str = "smollm2-135m-shape", levels: tuple[int, ...] = (1, 4, 16), requests: int = 32,
                    max_tokens: int = 32, pages: int = 4, max_side: int = 512, threads: int | None = None,
                    model: VLM | None = None, device: str = "auto", dtype: str = "auto",
                    out_dir: str | Path = "bench-results", progress: Callable[[str], None] = say) -> dict[str, Any]:
    import copy

    place = placement(device, dtype, threads)
    env = environment()
    progress(f"[bench serve] {describe(env)}; LLM {llm}; FastViT-MCi0 + Q-Former 64; {requests} requests about "
             f"{min(pages, requests)} pages, {max_tokens} new tokens at most; greedy")
    model = (model or build_bench_model(llm, max_side)).place(place.device, place.dtype)
    progress(f"[bench serve] {place.describe()}: fovea and the transformers peers alike")
    reference_lm = copy.deepcopy(model.lm)  # same device and dtype as fovea's: a fair pair
    reference_lm.set_attn_implementation("sdpa")
    reference_lm.generation_config.eos_token_id = None
    reference_lm.generation_config.pad_token_id = 0
    work = workload(requests, max_tokens, pages=pages)
    max_len = 64 + max(len(model.processor()(r["messages"], r["images"]).input_ids) for r in work) + max_tokens
    results: dict[str, dict[str, Any]] = {}
    modes = {
        "fovea": lambda c: run_fovea(model, work, c, max_len),
        # the same engine with its caches on: the workload's 4 pages are encoded once each, and a prompt about a
        # page seen before copies the system prompt's and the page's keys/values instead of prefilling them
        "fovea-caches-on": lambda c: run_fovea(model, work, c, max_len, caches=True),
        "hf-one-at-a-time": lambda c: run_hf_one_at_a_time(model, reference_lm, work, c),
        "hf-padded-batch": lambda c: run_hf_padded(model, reference_lm, work, c),
    }
    run_fovea(model, work[:2], 2, max_len)  # warm-up: first-call allocations and kernel selection
    for c in levels:
        for mode, fn in modes.items():
            progress(f"[bench serve] concurrency {c}: {mode} ...")
            r = fn(c)
            results.setdefault(str(c), {})[mode] = r
            progress(f"[bench serve]   {r['throughput_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s "
                     f"p90 {r['ttft_p90_s']:.2f} s ({r['requests']} answered, {len(r['errors'])} errors)")
    ratios = {c: {"fovea / hf-padded-batch throughput": v["fovea"]["throughput_tok_s"]
                  / v["hf-padded-batch"]["throughput_tok_s"],
                  "fovea-caches-on / hf-padded-batch throughput": v["fovea-caches-on"]["throughput_tok_s"]
                  / v["hf-padded-batch"]["throughput_tok_s"],
                  "fovea / hf-one-at-a-time throughput": v["fovea"]["throughput_tok_s"]
                  / v["hf-one-at-a-time"]["throughput_tok_s"]} for c, v in results.items()}
    payload = {"benchmark": "serve", "env": env, "llm": llm, "requests": requests, "max_tokens": max_tokens,
               "device": str(place.device), "dtype": dtype_name(place.dtype),
               "pages": pages, "levels": list(levels), "results": results, "ratios": ratios,
               "command": f"fovea bench serve --llm {llm} --requests {requests} --max-tokens {max_tokens} "
                          f"--pages {pages} --levels {' '.join(str(c) for c in levels)}"}
    return save_results(payload, out_dir, "serve", chart, progress)


def format_table(payload: dict[str, Any]) -> str:
    head = f"{'conc.':>5} {'mode':<18} {'tok/s':>8} {'wall':>8} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'answered':>9}"
    lines = [head, "-" * len(head)]
    for c, modes in payload["results"].items():
        for mode, r in modes.items():
            lines.append(f"{c:>5} {mode:<18} {r['throughput_tok_s']:>8.1f} {r['wall_s']:>6.1f} s "
                         f"{r['ttft_p50_s']:>7.2f} s {r['ttft_p90_s']:>6.2f} s {r['ttft_p99_s']:>6.2f} s "
                         f"{r['requests']:>9}")
        for name, value in payload["ratios"][c].items():
            lines.append(f"      {name}: {value:.2f}x")
    lines.append(describe(payload["env"]))
    return "\n".join(lines)


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = list(payload["results"])
    for mode in next(iter(payload["results"].values())):
        ax_t.plot(levels, [payload["results"][c][mode]["throughput_tok_s"] for c in levels], marker="o", label=mode)
        ax_l.plot(levels, [payload["results"][c][mode]["ttft_p50_s"] for c in levels], marker="o", label=mode)
    ax_t.set_ylabel("throughput (completion tokens/s)")
    ax_l.set_ylabel("TTFT p50 (s)")
    for ax in (ax_t, ax_l):
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fovea bench serve ({payload['llm']}, {payload['env']['threads']} threads, "
                 f"{payload['env']['device']})")
    save_figure(fig, path)
