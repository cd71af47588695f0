"""`fovea bench ...` sub-commands: thin wrappers over the benchmark functions."""

from __future__ import annotations

import argparse
import json


def cmd_bench_packing(lm: str, quick: bool, threads: int | None, repeats: int, out: str, device: str = "auto",
                      dtype: str = "auto") -> int:
    """Padded vs packed vs one-at-a-time forward over mixed-length sequences; JSON + PNG chart."""
    from fovea.bench.packing import format_table, run_packing_bench

    payload = run_packing_bench(lm=lm, quick=quick, threads=threads, repeats=repeats, out_dir=out, device=device,
                                dtype=dtype,
                                progress=lambda s: print(s, flush=True))
    print()
    print(format_table(payload))
    return 0


def cmd_bench_encoder(quick: bool, threads: int | None, repeats: int, max_run_s: float, out: str, device: str,
                      dtypes: list[str]) -> int:
    """Encoder latency, peak memory, GFLOPs, tokens and the hardware limit versus resolution, per dtype; JSON + PNG."""
    from fovea.bench.encoder import format_table, run_encoder_bench

    payload = run_encoder_bench(quick=quick, threads=threads, repeats=repeats, max_run_s=max_run_s, out_dir=out,
                                device=device, dtypes=tuple(dtypes), progress=lambda s: print(s, flush=True))
    print()
    print(format_table(payload))
    return 0


def cmd_bench_ttft(quick: bool, llm: list[str] | None, max_side: int, threads: int | None, repeats: int,
                   no_peers: bool, only: str | None, out: str, device: str = "auto", dtype: str = "auto",
                   model: str | None = None) -> int:
    """Time to first token by stage on a 2880x2160 page, beside transformers' FastVLM and LLaVA-NeXT (or of one
    trained model, with --model)."""
    from fovea.bench.ttft import format_table, run_ttft_bench

    payload = run_ttft_bench(llms=llm, quick=quick, max_side=max_side, threads=threads, repeats=repeats,
                             peers=not no_peers, only=only, out_dir=out, device=device, dtype=dtype, model=model,
                             progress=lambda s: print(s, flush=True))
    print()
    print(format_table(payload))
    return 0


def cmd_bench_serve(llm: str, requests: int, max_tokens: int, pages: int, levels: list[int], threads: int | None,
                    out: str, device: str = "auto", dtype: str = "auto") -> int:
    """Engine throughput and TTFT percentiles vs transformers generate (one at a time, padded batch)."""
    from fovea.bench.serve import format_table, run_serve_bench

    payload = run_serve_bench(llm=llm, requests=requests, max_tokens=max_tokens, pages=pages, levels=tuple(levels),
                              threads=threads, out_dir=out, device=device, dtype=dtype,
                              progress=lambda s: print(s, flush=True))
    print()
    print(format_table(payload))
    return 0


def cmd_bench_faults(llm: str, honest: int, burst: int, threads: int | None, out: str) -> int:
    """Replay hostile requests (malformed, oversized, bombs, abandoned, half-sent, a burst) while honest clients
    load the server; checks every answer and that no accepted request is lost; JSON + PNG."""
    from fovea.bench.faults import run_faults_bench

    payload = run_faults_bench(llm=llm, honest=honest, burst=burst, threads=threads, out_dir=out,
                               progress=lambda s: print(s, flush=True))
    report = payload["report"]
    print(json.dumps({k: report[k] for k in ("ok", "honest", "burst", "latency_s", "rss_mb")}, indent=2))
    return 0 if report["ok"] else 1


def cmd_bench_pages(pages: str, llm: str, max_side: int, budget: int, threads: int | None, out: str,
                    device: str = "auto", dtype: str = "auto") -> int:
    """TTFT for 1-, 4- and 16-page PDFs: a fixed token budget per page (Q-Former) against the 1:1 layout
    (FastViTHD + MLP), through the engine with caches off; JSON + PNG."""
    from fovea.bench.pages import format_table, run_pages_bench

    counts = tuple(int(v) for v in pages.split(","))
    payload = run_pages_bench(pages=counts, llm=llm, max_side=max_side, budget=budget, threads=threads,
                              device=device, dtype=dtype, out_dir=out, progress=lambda s: print(s, flush=True))
    print(format_table(payload))
    return 0


def cmd_bench_batch(documents: int, model: str | None, llm: str | None, clients: int, out: str) -> int:
    """Documents per hour: `fovea batch` on 1 and 2 Ray workers and the same pages sent to `fovea serve` by a
    client pool, in one run; JSON + PNG."""
    from fovea.bench.batch import format_table, run_batch_bench

    payload = run_batch_bench(documents=documents, model=model, llm=llm, clients=clients, out_dir=out,
                              progress=lambda s: print(s, flush=True))
    print(format_table(payload))
    return 0


def _placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where native, else float32), float32, bfloat16, float16")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write JSON and PNG charts",
                           description="Benchmarks: each warms up, repeats, reports median/min/max, writes JSON + PNG.")
    which = bench.add_subparsers(dest="bench", required=True)
    p = which.add_parser("packing", help=cmd_bench_packing.__doc__, description=cmd_bench_packing.__doc__)
    p.add_argument("--lm", default="llama-6l-512", help="LLM preset (random weights)")
    p.add_argument("--quick", action="store_true", help="lengths divided by 4: a run of about a minute")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per mode (after one warm-up)")
    p.add_argument("--out", default="bench-results", help="directory for packing.json and packing.png")
    _placement_flags(p)
    p.set_defaults(run=lambda a: cmd_bench_packing(a.lm, a.quick, a.threads, a.repeats, a.out, a.device, a.dtype))

    p = which.add_parser("batch", help=cmd_bench_batch.__doc__, description=cmd_bench_batch.__doc__)
    p.add_argument("--documents", type=int, default=8, help="2880x2160 contract pages to read")
    p.add_argument("--model", default=None, help="fovea model directory or preset (default fastvithd-qformer-64)")
    p.add_argument("--llm", default=None, help="LLM for a preset (default: smollm2 if fetched, else its shape)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients against fovea serve")
    p.add_argument("--out", default="bench-results", help="directory for batch.json and batch.png")
    p.set_defaults(run=lambda a: cmd_bench_batch(a.documents, a.model, a.llm, a.clients, a.out))

    p = which.add_parser("pages", help=cmd_bench_pages.__doc__, description=cmd_bench_pages.__doc__)
    p.add_argument("--pages", default="1,4,16", help="document lengths to time, comma-separated")
    p.add_argument("--llm", default="smollm2", help="LLM (smollm2 if fetched, else its random shape)")
    p.add_argument("--max-side", type=int, default=1024, help="long side each page is rendered and encoded at")
    p.add_argument("--budget", type=int, default=64, help="the Q-Former's visual tokens per page")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="bench-results", help="directory for pages.json and pages.png")
    _placement_flags(p)
    p.set_defaults(run=lambda a: cmd_bench_pages(a.pages, a.llm, a.max_side, a.budget, a.threads, a.out, a.device,
                                                 a.dtype))

    p = which.add_parser("encoder", help=cmd_bench_encoder.__doc__, description=cmd_bench_encoder.__doc__)
    p.add_argument("--quick", action="store_true", help="336, 672 and 1024 px only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per point (fewer when one run is long)")
    p.add_argument("--max-run-s", type=float, default=300.0, help="skip (and record) points estimated above this")
    p.add_argument("--out", default="bench-results", help="directory for encoder.json and encoder.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", type=lambda v: v.split(","),
                   help="comma-separated dtypes measured in one run, e.g. float32,bfloat16 (auto: the policy's)")
    p.set_defaults(run=lambda a: cmd_bench_encoder(a.quick, a.threads, a.repeats, a.max_run_s, a.out, a.device,
                                                   a.dtype))

    p = which.add_parser("serve", help=cmd_bench_serve.__doc__, description=cmd_bench_serve.__doc__)
    p.add_argument("--llm", default="smollm2-135m-shape", help="LLM preset or smollm2")
    p.add_argument("--requests", type=int, default=32, help="requests in the workload")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (at most)")
    p.add_argument("--pages", type=int, default=4,
                   help="distinct pages the requests ask about (= --requests: every request brings a new page)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default="bench-results", help="directory for serve.json and serve.png")
    _placement_flags(p)
    p.set_defaults(run=lambda a: cmd_bench_serve(a.llm, a.requests, a.max_tokens, a.pages, a.levels, a.threads,
                                                 a.out, a.device, a.dtype))

    p = which.add_parser("faults", help=cmd_bench_faults.__doc__, description=cmd_bench_faults.__doc__)
    p.add_argument("--llm", default="smollm2-135m-shape", help="LLM preset or smollm2")
    p.add_argument("--honest", type=int, default=64, help="honest clients during the attacks")
    p.add_argument("--burst", type=int, default=200, help="requests sent at once afterwards")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default="bench-results", help="directory for faults.json and faults.png")
    p.set_defaults(run=lambda a: cmd_bench_faults(a.llm, a.honest, a.burst, a.threads, a.out))

    p = which.add_parser("ttft", help=cmd_bench_ttft.__doc__, description=cmd_bench_ttft.__doc__)
    p.add_argument("--quick", action="store_true", help="fewer layouts, SmolLM2 only: a few minutes")
    p.add_argument("--llm", action="append", default=None,
                   help="LLM preset, repeatable (default: qwen2-0.5b-shape and smollm2; --quick: smollm2)")
    p.add_argument("--max-side", type=int, default=1536, help="long side of the FastViTHD input")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per stage (fewer when one run is long)")
    p.add_argument("--no-peers", action="store_true", help="skip the transformers FastVLM / LLaVA-NeXT peers")
    p.add_argument("--only", default=None, help="only layouts whose name contains this, e.g. 'MLP (FastVLM)'")
    p.add_argument("--out", default="bench-results", help="directory for ttft.json and ttft.png")
    p.add_argument("--model", default=None, help="time this trained model alone (e.g. document-reader, a model "
                   "directory) against its own FLOP limit, instead of the layouts")
    _placement_flags(p)
    p.set_defaults(run=lambda a: cmd_bench_ttft(a.quick, a.llm, a.max_side, a.threads, a.repeats, a.no_peers,
                                                a.only, a.out, a.device, a.dtype, a.model))
