"""`fovea bench packing`: one forward over many sequences, padded vs packed vs one at a time, same weights.

Modes (all in one run, on copies of one model):
- padded: transformers' own model, right-padded batches with an attention mask (SDPA);
- one-at-a-time: transformers' own model, each sequence alone;
- hf-packed-dense: transformers' own model on the packed stream (no cache object, so it detects the packing from
  the position ids), its SDPA with the (T, T) block mask it builds;
- fovea-packed: the same stream through fovea's ``segments`` backend (cu_seqlens passed explicitly).

Attention FLOPs are those issued to the kernels: 4 * layers * width * (query x key pairs computed); a causal kernel
may skip about half of each square, which is the same for every mode.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fovea.attention import use_backend
from fovea.bench.common import (
    describe,
    environment,
    save_results,
    time_call,
)
from fovea.config import LMConfig
from fovea.lm import build_lm
from fovea.log import say
from fovea.packing import Sample, first_fit_decreasing, pack
from fovea.packing.binpack import packing_stats
from fovea.plotting import pyplot, save_figure
from fovea.runtime import dtype_name, placement

SEED_LENGTHS = [50, 120, 300, 80, 4000, 60, 900, 200]


def _ids(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _padded_batches(seqs: list[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        longest = max(len(s) for s in group)
        ids = torch.zeros(len(group), longest, dtype=torch.long)  # (B,Lmax)
        mask = torch.zeros(len(group), longest, dtype=torch.long)
        for j, s in enumerate(group):
            ids[j, : len(s)], mask[j, : len(s)] = s, 1
        out.append((ids, mask))
    return out


def run_case(name: str, lengths: list[int], *, reference: torch.nn.Module, packed_model: torch.nn.Module,
             batch_size: int, capacity: int, warmup: int, repeats: int, seed: int,
             progress: Callable[[str], None]) -> dict[str, Any]:
    cfg = reference.config
    device = next(reference.parameters()).device
    seqs = _ids(lengths, cfg.vocab_size, seed)
    real = sum(lengths)
    bins = first_fit_decreasing(lengths, capacity)
    streams = [pack([Sample(input_ids=seqs[i]) for i in b]).to(device) for b in bins]
    padded = [(i.to(device), m.to(device)) for i, m in _padded_batches(seqs, batch_size)]
    seqs = [s.to(device) for s in seqs]
    per_pair = 4 * cfg.num_hidden_layers * cfg.hidden_size
    plain = dict(logits_to_keep=1, use_cache=False)

    def run_padded():
        return [reference(input_ids=i, attention_mask=m, **plain) for i, m in padded]

    def run_alone():
        return [reference(input_ids=s[None], **plain) for s in seqs]

    def run_hf_packed():
        return [reference(input_ids=b.input_ids[None], position_ids=b.position_ids[None], **plain) for b in streams]

    def run_fovea_packed():
        return [packed_model(input_ids=b.input_ids[None], **plain, **b.lm_kwargs()) for b in streams]

    modes: dict[str, tuple[Callable[[], Any], int, int]] = {  # mode: (forward, tokens computed, q-k pairs computed)
        "padded": (run_padded, sum(i.numel() for i, _ in padded), sum(i.shape[0] * i.shape[1] ** 2 for i, _ in padded)),
        "one-at-a-time": (run_alone, real, sum(n * n for n in lengths)),
        "hf-packed-dense": (run_hf_packed, real, sum(b.num_tokens**2 for b in streams)),
        "fovea-packed": (run_fovea_packed, real, sum(n * n for n in lengths)),
    }
    results: dict[str, Any] = {}
    for mode, (fn, computed, pairs) in modes.items():
        progress(f"[bench packing] {name}: {mode} ({warmup} warm-up + {repeats} runs) ...")
        with torch.inference_mode():
            timing = time_call(fn, warmup=warmup, repeats=repeats)
        results[mode] = {
            **timing.to_dict(), "tokens_per_s": real / timing.median_s, "computed_tokens": computed,
            "padding_share": 1 - real / computed, "attention_gflops": per_pair * pairs / 1e9,
        }
        progress(f"[bench packing] {name}: {mode} median {timing.median_s:.2f} s "
                 f"(min {timing.min_s:.2f}, max {timing.max_s:.2f})")
    stats = packing_stats(lengths, bins, capacity)
    fovea = results["fovea-packed"]["median_s"]
    return {
        "lengths": lengths, "real_tokens": real, "batch_size": batch_size, "capacity": capacity,
        "streams": len(bins), "packing_efficiency": stats.efficiency, "modes": results,
        "speedup_vs_padded": results["padded"]["median_s"] / fovea,
        "speed_vs_one_at_a_time": results["one-at-a-time"]["median_s"] / fovea,
        "speedup_vs_hf_packed_dense": results["hf-packed-dense"]["median_s"] / fovea,
    }


def run_packing_bench(*, lm: str = "llama-6l-512", quick: bool = False, threads: int | None = None,
                      warmup: int = 1, repeats: int = 3, mix_count: int = 12, seed: int = 0,
                      device: str = "auto", dtype: str = "auto",
                      out_dir: str | Path = "bench-results", progress: Callable[[str], None] = say) -> dict[str, Any]:
    place = placement(device, dtype, threads)
    env = environment()
    progress(f"[bench packing] {describe(env)}; LLM preset {lm!r} (random weights); {place.describe()}")
    torch.manual_seed(seed)
    reference, _ = build_lm(LMConfig(name=lm))
    reference.eval().to(place.device, place.dtype)
    reference.set_attn_implementation("sdpa")
    packed_model = copy.deepcopy(reference)
    use_backend(packed_model, "segments")
    scale = 4 if quick else 1
    rng = random.Random(seed)
    seed_lengths = [max(1, n // scale) for n in SEED_LENGTHS]
    mix = [rng.randint(50 // scale, 4000 // scale) for _ in range(mix_count)]
    capacity = 8192 // scale
    common = dict(reference=reference, packed_model=packed_model, capacity=capacity, warmup=warmup,
                  repeats=repeats, seed=seed, progress=progress)
    cases = {
        "seed": run_case("seed", seed_lengths, batch_size=len(seed_lengths), **common),
        "random-mix": run_case("random-mix", mix, batch_size=4, **common),
    }
    payload = {"benchmark": "packing", "env": env, "lm": lm, "quick": quick, "cases": cases,
               "device": str(place.device), "dtype": dtype_name(place.dtype),
               "command": _command(lm, quick, threads, repeats, out_dir)}
    return save_results(payload, out_dir, "packing", chart, progress)


def _command(lm: str, quick: bool, threads: int | None, repeats: int, out_dir: str | Path) -> str:
    parts = ["fovea bench packing", f"--lm {lm}", f"--repeats {repeats}", f"--out {out_dir}"]
    if quick:
        parts.append("--quick")
    if threads:
        parts.append(f"--threads {threads}")
    return " ".join(parts)


def format_table(payload: dict[str, Any]) -> str:
    lines = []
    for name, case in payload["cases"].items():
        lines.append(f"{name}: {len(case['lengths'])} sequences, {case['real_tokens']:,} real tokens, "
                     f"{case['streams']} packed stream(s) of {case['capacity']:,} "
                     f"(efficiency {case['packing_efficiency']:.0%}), padded batches of {case['batch_size']}")
        lines.append(f"  {'mode':<18} {'median':>9} {'min':>8} {'max':>8} {'tok/s':>9} {'padding':>8} "
                     f"{'attn GFLOP':>11}")
        for mode, r in case["modes"].items():
            lines.append(f"  {mode:<18} {r['median_s']:>7.2f} s {r['min_s']:>6.2f} s {r['max_s']:>6.2f} s "
                         f"{r['tokens_per_s']:>9,.0f} {r['padding_share']:>8.0%} {r['attention_gflops']:>11.1f}")
        lines.append(f"  fovea-packed vs padded: {case['speedup_vs_padded']:.1f}x faster; vs one-at-a-time: "
                     f"{case['speed_vs_one_at_a_time']:.2f}x the speed; vs hf-packed-dense: "
                     f"{case['speedup_vs_hf_packed_dense']:.1f}x faster")
    lines.append(describe(payload["env"]))
    return "\n".join(lines)


def chart(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    cases = payload["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5))
    for ax, (name, case) in zip(axes if len(cases) > 1 else [axes], cases.items(), strict=True):
        modes = list(case["modes"])
        medians = [case["modes"][m]["median_s"] for m in modes]
        errs = [[m - case["modes"][k]["min_s"] for k, m in zip(modes, medians, strict=True)],
                [case["modes"][k]["max_s"] - m for k, m in zip(modes, medians, strict=True)]]
        bars = ax.bar(modes, medians, yerr=errs, color=["#c44", "#888", "#48c", "#2a2"], capsize=4)
        for bar, m in zip(bars, modes, strict=True):
            share = case["modes"][m]["padding_share"]
            ax.annotate(f"{bar.get_height():.2f}s\npad {share:.0%}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name}: {case['real_tokens']:,} tokens, {len(case['lengths'])} sequences")
        ax.set_ylabel("forward wall time, median (s)")
        ax.set_ylim(0, max(r["max_s"] for r in case["modes"].values()) * 1.2)  # room for the labels
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"fovea bench packing ({payload['lm']}, {payload['env']['threads']} threads, "
                 f"{payload['env']['device']})")
    save_figure(fig, path)
