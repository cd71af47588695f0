"""Document question answering, held out: normalised exact match per question kind and per document kind, how often
the model invents an answer the page does not hold, and time to first token, as a table, JSON and a PNG.

Scoring is separate from generation (``score``) so that it can be checked on hand-made answers.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REFUSAL = "Not on the page."  # the answer a reader gives when the page does not hold what was asked
CURRENCY = "$€£¥₹"  # symbols that do not count: "$1,204.50" and "1,204.50" are the same answer
# Fields named after what they hold ("clause_3_title", "table_storage_total", "qty_paper") group into one kind.
NUMBERED_FIELDS = (("clause_", "_title", "clause_title"), ("table_", "_total", "table_total"), ("qty_", "", "quantity"))


def normalise(text: str) -> str:
    """What exact match compares: case, runs of whitespace, currency symbols and a final full stop do not count."""
    text = str(text).casefold().translate({ord(c): None for c in CURRENCY})
    return " ".join(text.split()).rstrip(".").strip()


def is_refusal(text: str) -> bool:
    return normalise(text) == normalise(REFUSAL)


def question_kind(meta: dict, reference: str) -> str:
    """A record's ``question_kind`` if it names one; "absent" when the reference is the refusal; else its ``field``
    (``NUMBERED_FIELDS`` grouped)."""
    if meta.get("question_kind"):
        return str(meta["question_kind"])
    if is_refusal(reference):
        return "absent"
    field = str(meta.get("field") or "")
    if not field:
        return "unlabelled"
    for prefix, suffix, kind in NUMBERED_FIELDS:
        if field.startswith(prefix) and field.endswith(suffix):
            return kind
    return field


@dataclass
class Row:
    id: Any  # the record's id
    document_kind: str  # the record's "kind" (invoice, lease, ...) or "unlabelled"
    question_kind: str  # see ``question_kind``
    question: str  # the last user turn
    reference: str  # the exact answer
    answer: str  # what the model said
    hit: bool  # normalised answer == normalised reference
    ttft_ms: float | None = None  # time to first token of this request
    cold: bool | None = None  # True when its page had to be encoded (not from the encoder cache)
    visual_tokens: int | None = None  # visual tokens the LLM read for this question


def make_row(record, answer: str, ttft_ms: float | None = None, cold: bool | None = None,
             visual_tokens: int | None = None) -> Row:
    """One scored answer: ``record`` a ``fovea.data.records.Record`` whose last assistant turn is the reference."""
    from fovea.data.records import split_reference

    prompt, reference = split_reference(record)
    asked = [m for m in prompt if m["role"] == "user"]
    question = str(asked[-1]["content"]).replace("<image>", "").strip() if asked else ""
    return Row(id=record.id, document_kind=str(record.meta.get("kind") or "unlabelled"),
               question_kind=question_kind(record.meta, reference), question=question, reference=reference,
               answer=answer, hit=normalise(answer) == normalise(reference), ttft_ms=ttft_ms, cold=cold,
               visual_tokens=visual_tokens)


def _share(rows: Sequence[Row]) -> dict[str, Any]:
    hits = sum(r.hit for r in rows)
    return {"n": len(rows), "correct": hits, "exact_match": hits / len(rows) if rows else 0.0}


def score(rows: Sequence[Row]) -> dict[str, Any]:
    """Exact match overall, per question kind and per document kind; "invented": the share of questions whose
    answer is not on the page that got something other than the refusal; refusals given where an answer existed;
    median TTFT, cold (page encoded) and warm (page from the encoder cache)."""
    by_question, by_document = defaultdict(list), defaultdict(list)
    for r in rows:
        by_question[r.question_kind].append(r)
        by_document[r.document_kind].append(r)
    absent = [r for r in rows if is_refusal(r.reference)]
    present = [r for r in rows if not is_refusal(r.reference)]

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    return {
        **_share(rows),
        "by_question_kind": {k: _share(v) for k, v in sorted(by_question.items())},
        "by_document_kind": {k: _share(v) for k, v in sorted(by_document.items())},
        "invented": {"n": len(absent), "rate": sum(not is_refusal(r.answer) for r in absent) / len(absent)
                     if absent else None},
        "refused_answerable": {"n": len(present), "rate": sum(is_refusal(r.answer) for r in present) / len(present)
                               if present else None},
        "visual_tokens": median(r.visual_tokens for r in rows),
        "ttft_ms": {"median": median(r.ttft_ms for r in rows),
                    "median_cold": median(r.ttft_ms for r in rows if r.cold),
                    "median_warm": median(r.ttft_ms for r in rows if r.cold is False)},
    }


def table(result: dict[str, Any]) -> str:
    """The report as Markdown: one line per question kind, then per document kind."""
    lines = ["| group | kind | questions | correct | exact match |", "|---|---|---|---|---|"]
    lines.append(f"| all | all | {result['n']} | {result['correct']} | {result['exact_match']:.1%} |")
    for group, key in (("question", "by_question_kind"), ("document", "by_document_kind")):
        for kind, s in result[key].items():
            lines.append(f"| {group} | {kind} | {s['n']} | {s['correct']} | {s['exact_match']:.1%} |")
    invented, ttft = result["invented"], result["ttft_ms"]
    if invented["rate"] is not None:
        lines.append(f"\nInvented an answer on {invented['rate']:.1%} of {invented['n']} questions the page does not "
                     "answer.")
    if ttft["median"] is not None:
        parts = [f"median TTFT {ttft['median']:.0f} ms"]
        if ttft["median_cold"] is not None:
            parts.append(f"{ttft['median_cold']:.0f} ms when the page is encoded")
        if ttft["median_warm"] is not None:
            parts.append(f"{ttft['median_warm']:.0f} ms from the encoder cache")
        lines.append(", ".join(parts) + ".")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    from fovea.plotting import pyplot, save_figure

    plt = pyplot()
    groups = [("question kind", result["by_question_kind"]), ("document kind", result["by_document_kind"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(g[1]), 1) for g in groups]})
    for ax, (name, parts) in zip(axes, groups, strict=True):
        kinds = list(parts)
        values = [100 * parts[k]["exact_match"] for k in kinds]
        ax.bar(range(len(kinds)), values, color="tab:blue")
        ax.set_xticks(range(len(kinds)), [f"{k}\n(n={parts[k]['n']})" for k in kinds], rotation=45, ha="right",
                      fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("exact match, %")
        ax.set_title(f"by {name}")
        ax.axhline(100 * result["exact_match"], color="tab:red", linestyle="--", linewidth=1, label="all")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def evaluate_qa(data: str | Path, model, *, max_tokens: int = 32, batch: int = 8, limit: int | None = None,
                out: str | Path | None = None, title: str | None = None, progress=None) -> dict[str, Any]:
    """Greedy answers of ``model`` (a loaded VLM) to every record of ``data`` through fovea's engine, with its
    encoder cache on (each page is encoded once for all its questions, as a server would), scored by ``score``.
    Writes ``qa-eval.json`` (summary and every answer) and ``qa-eval.png`` under ``out`` when given."""
    import torch

    from fovea.data.records import load_page, read_records, split_reference
    from fovea.engine import Engine, EngineConfig, SamplingParams

    records = read_records(data)[:limit] if limit else read_records(data)
    if not records:
        raise ValueError(f"data file {str(data)!r} has no records")
    engine = Engine(model, EngineConfig(max_batch=batch, max_len=8192, step_tokens=4096))
    rows: list[Row] = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        requests = []
        for r in chunk:
            prompt, _ = split_reference(r)
            images = [load_page(p, engine.processor, r.id) for p in r.images]
            requests.append((prompt, images, SamplingParams(max_tokens=max_tokens)))
        with torch.no_grad():
            results = engine.generate(requests)
        for r, res in zip(chunk, results, strict=True):
            m = res["metrics"]
            rows.append(make_row(r, res["text"], ttft_ms=m.ttft_ms if m else None,
                                 cold=(m.encoder_cache_hits == 0) if m and r.images else None,
                                 visual_tokens=m.visual_tokens if m else None))
        if progress:
            progress(len(rows), len(records))
    result = score(rows)
    result["data"], result["max_tokens"] = str(data), max_tokens
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "qa-eval.json").write_text(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=1))
        plot(result, out / "qa-eval.png", title or f"exact match on {Path(data).name} ({result['n']} questions)")
    return result
