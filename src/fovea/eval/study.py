"""The equal-budget bridge study: every connector, at every budget it has, trained from the same encoder, LLM,
data, steps, optimiser and seeds (stage ``align``: only the bridge learns), then asked the same held-out questions.
The encoder is frozen, so its features are computed once for the whole study and shared by every cell.

Each cell is its own resumable ``fovea train`` run under ``out/<cell>/``; a finished cell leaves ``cell.json`` and
is skipped when the study runs again, an unfinished one resumes from its last checkpoint. The connector weights stay
in the cell's last checkpoint (the full model is not kept: it is the shared LLM and encoder plus those weights).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# The bridges compared: a name in the study -> the connector settings it trains with.
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"name": "linear"},
    "mlp": {"name": "mlp"},
    "avgpool": {"name": "avgpool"},
    "perceiver": {"name": "perceiver"},
    "qformer": {"name": "qformer", "instruction_aware": False},
    "qformer-instruct": {"name": "qformer", "instruction_aware": True},
    "c_abstractor": {"name": "c_abstractor"},
}
BUDGETED = ("avgpool", "perceiver", "qformer", "c_abstractor")  # connectors with a token budget (the rest: 1:1)


@dataclass
class StudyConfig:
    data: str = ""  # training records (e.g. `fovea synth data/train`)
    eval_data: str = ""  # held-out records (e.g. `fovea synth data/heldout --split heldout --seed 1`)
    out: str = "runs/study"  # one folder per cell, the shared features/, study.json, study.md, study.png
    model: str = "reader-qformer-64"  # the preset whose encoder and LLM every cell shares
    llm: str | None = None  # its LLM (default: SmolLM2 if fetched, else its shape)
    connectors: tuple[str, ...] = tuple(VARIANTS)  # bridges compared: linear, mlp, avgpool, perceiver, qformer,
    #                                                qformer-instruct (the instruction joins), c_abstractor
    budgets: tuple[int, ...] = (64, 128, 256)  # visual tokens per page for connectors with a budget
    seeds: tuple[int, ...] = (0, 1)  # each cell is trained once per seed (initialisation and data order)
    steps: int = 200  # optimizer steps per cell
    batch_size: int = 8  # questions per step
    lr: float = 1e-4  # peak AdamW learning rate
    warmup_steps: int = 10  # linear warm-up
    save_every: int = 50  # checkpoint interval (cells resume from the last one)
    eval_limit: int | None = None  # held-out questions per cell (None = all)
    max_tokens: int = 32  # answer tokens generated per question
    threads: int | None = None  # torch threads
    cache_features: str = "bf16"  # the shared encoder features: bf16 or fp32

    TUPLES: ClassVar[tuple[str, ...]] = ("connectors", "budgets", "seeds")

    def validate(self) -> None:
        if not self.data or not self.eval_data:
            raise ValueError("the study needs data (training records) and eval_data (held-out records)")
        unknown = [c for c in self.connectors if c not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown bridges {unknown}; available: {sorted(VARIANTS)}")
        if not self.seeds:
            raise ValueError("the study needs at least one seed (--seeds)")
        bad = [b for b in self.budgets if b < 1]
        if bad or self.steps < 1:
            raise ValueError(f"budgets and steps must be >= 1, got budgets {bad or list(self.budgets)} and steps "
                             f"{self.steps}")


@dataclass
class Cell:
    variant: str  # key of VARIANTS
    budget: int | None  # visual tokens per page (None: one per encoder cell)
    seed: int  # initialisation and data order
    result: dict[str, Any] = field(default_factory=dict)  # filled when run

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.budget or '1to1'}-s{self.seed}"

    @property
    def settings(self) -> dict[str, Any]:
        budget = {"num_queries": self.budget} if self.budget else {}
        return {**VARIANTS[self.variant], **budget}


def cells(cfg: StudyConfig) -> list[Cell]:
    """Every (bridge, budget, seed), bridges without a budget once per seed."""
    out = []
    for variant in cfg.connectors:
        budgets = cfg.budgets if VARIANTS[variant]["name"] in BUDGETED else (None,)
        out += [Cell(variant, budget, seed) for budget in budgets for seed in cfg.seeds]
    return out


def run_cell(cfg: StudyConfig, cell: Cell, progress: bool = True) -> dict[str, Any]:
    """Train one cell (or resume it), evaluate it on the held-out records, keep ``cell.json``."""
    from fovea.eval.qa import evaluate_qa
    from fovea.train.trainer import TrainConfig, TrainRecipe, latest_checkpoint

    folder = Path(cfg.out) / cell.name
    if (folder / "cell.json").is_file():
        return json.loads((folder / "cell.json").read_text())
    train_cfg = TrainConfig(
        data=cfg.data, out=str(folder), model=cfg.model, llm=cfg.llm, connector=cell.settings, stage="align",
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, eval_every=0,
        eval_data=cfg.eval_data, eval_samples=1, save_every=cfg.save_every, seed=cell.seed, threads=cfg.threads,
        cache_features=cfg.cache_features, feature_cache=str(Path(cfg.out) / "features"))
    recipe = TrainRecipe(train_cfg, resume=latest_checkpoint(folder) is not None, progress=progress)
    result = recipe.run()
    scores = evaluate_qa(cfg.eval_data, recipe.model.eval(), max_tokens=cfg.max_tokens, limit=cfg.eval_limit,
                         out=folder)
    found = {"cell": cell.name, "variant": cell.variant, "budget": cell.budget, "seed": cell.seed,
             "steps": cfg.steps, "trainable_parameters": result.trainable_parameters,
             "final_loss": result.losses[-1] if result.losses else None, "scores": scores}
    shutil.rmtree(folder / "final", ignore_errors=True)  # the shared LLM and encoder again: the checkpoint suffices
    (folder / "cell.json").write_text(json.dumps(found, indent=1))
    return found


def summarise(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (bridge, budget): exact match as mean and spread over seeds, per question kind, TTFT, visual
    tokens and trainable parameters."""
    groups: dict[tuple[str, Any], list[dict]] = {}
    for f in found:
        groups.setdefault((f["variant"], f["budget"]), []).append(f)
    rows = []
    for (variant, budget), runs in groups.items():
        em = [r["scores"]["exact_match"] for r in runs]
        kinds = sorted({k for r in runs for k in r["scores"]["by_question_kind"]})
        rows.append({
            "variant": variant, "budget": budget, "seeds": len(runs), "exact_match": statistics.mean(em),
            "spread": (min(em), max(em)),
            "by_question_kind": {k: statistics.mean(r["scores"]["by_question_kind"].get(k, {}).get("exact_match", 0)
                                                    for r in runs) for k in kinds},
            "visual_tokens": runs[0]["scores"].get("visual_tokens"),
            "ttft_ms": statistics.median(r["scores"]["ttft_ms"]["median_cold"] or r["scores"]["ttft_ms"]["median"]
                                         for r in runs),
            "trainable_parameters": runs[0]["trainable_parameters"],
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in rows for k in r["by_question_kind"]})
    head = ["bridge", "visual tokens", "exact match (seeds: min-max)", *kinds, "TTFT ms", "trainable"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        spread = f"{r['exact_match']:.1%} ({r['spread'][0]:.1%}-{r['spread'][1]:.1%}, {r['seeds']})"
        per_kind = [f"{r['by_question_kind'].get(k, 0):.1%}" for k in kinds]
        lines.append("| " + " | ".join([r["variant"], str(r["visual_tokens"]), spread, *per_kind,
                                        f"{r['ttft_ms']:.0f}", f"{r['trainable_parameters']:,}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Exact match against visual tokens per page, one series per bridge, bars from the seeds' min to max."""
    from fovea.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["visual_tokens"] or 0)
        xs = [r["visual_tokens"] for r in mine]
        ys = [100 * r["exact_match"] for r in mine]
        err = [[100 * (r["exact_match"] - r["spread"][0]) for r in mine],
               [100 * (r["spread"][1] - r["exact_match"]) for r in mine]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per page (LLM prefill)")
    ax.set_ylabel("held-out exact match, %")
    ax.set_title("bridges at equal training compute")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run_study(cfg: StudyConfig, *, progress: bool = True,
              report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every cell in turn (finished ones skipped), then study.json, study.md and study.png under ``cfg.out``."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study-config.json").write_text(json.dumps(asdict(cfg), indent=1))
    todo = cells(cfg)
    found = []
    for i, cell in enumerate(todo, start=1):
        report(f"fovea study: cell {i}/{len(todo)}: {cell.name}")
        found.append(run_cell(cfg, cell, progress=progress))
    rows = summarise(found)
    (out / "study.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows, "cells": found}, indent=1))
    (out / "study.md").write_text(table(rows) + "\n")
    plot(rows, out / "study.png")
    return rows
