"""Training data: LLaVA conversation records and ``messages`` + ``images`` records -> packed-ready ``Sample``s
with the loss on answer tokens only. A bad record (missing or corrupt image, no answer) is reported with its id
and skipped or stops the run, as the caller chooses; it is never dropped silently.

Notation: L tokens in a conversation after placeholder expansion.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fovea.log import say
from fovea.packing import IGNORE_INDEX, Sample
from fovea.preprocess.document import open_document, sniff

_STRUCTURAL = ("id", "image", "images", "conversations", "messages")  # keys a record is made of; the rest is meta
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A record that cannot become a training sample; the message names the record."""

    def __init__(self, record_id: Any, reason: str) -> None:
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id, self.reason = record_id, reason


@dataclass
class Record:
    id: Any  # the record's id, for messages
    messages: list[dict]  # OpenAI-style: role user/assistant/system, content text with <image> placeholders
    images: list[str] = field(default_factory=list)  # image paths (or doc.pdf#page=N), against the data file's folder
    problem: str | None = None  # what is structurally wrong with the record (reported when it is encoded)
    meta: dict = field(default_factory=dict)  # its other keys (document "kind", question "field", ...), for reports


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _paths(value: Any, key: str) -> tuple[list[str], str | None]:
    if value is None:
        return [], None
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value), None
    return [], f"{key} must be a path or a list of paths, got {_kind(value)}"


def _structure(item: dict) -> tuple[list[dict], list[str], str | None]:
    """Messages, image paths and the first structural problem of one record (None when it is well formed)."""
    if "conversations" in item:
        images, problem = _paths(item.get("image"), "image")
        turns = item["conversations"]
        if not isinstance(turns, list):
            return [], images, f"conversations must be a list of turns, got {_kind(turns)}"
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                return [], images, f"conversations[{j}] must be an object with 'from' and 'value', got {_kind(turn)}"
            if not isinstance(turn.get("value"), str):
                return [], images, f"conversations[{j}].value must be a string, got {_kind(turn.get('value'))}"
            messages.append({"role": _ROLES.get(turn.get("from"), str(turn.get("from"))), "content": turn["value"]})
        return messages, images, problem
    images, problem = _paths(item.get("images"), "images")
    messages = item.get("messages")
    if not isinstance(messages, list):
        return [], images, f"messages must be a list, got {_kind(messages)}"
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            return [], images, f"messages[{j}] must be an object with 'role' and 'content', got {_kind(m)}"
        if not isinstance(m.get("content"), str):
            return [], images, f"messages[{j}].content must be a string, got {_kind(m.get('content'))}"
    return list(messages), images, problem


def split_reference(record: Record) -> tuple[list[dict], str]:
    """The conversation before the record's last answer (the prompt to generate from) and that answer (the
    reference an evaluation compares with); a record without an answer is a DataError naming it."""
    if record.problem:
        raise DataError(record.id, record.problem)
    answers = [i for i, m in enumerate(record.messages) if m["role"] == "assistant"]
    if not answers:
        raise DataError(record.id, "has no reference answer (no assistant turn)")
    return record.messages[:answers[-1]], str(record.messages[answers[-1]]["content"])


def read_records(path: str | Path) -> list[Record]:
    """A JSON list or JSONL file of records in either format:
    LLaVA: ``{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt", "value"}]}``;
    messages: ``{"id", "images": [paths], "messages": [{"role", "content"}]}``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {str(path)!r} is not JSON or JSONL: {err}") from None
    root = path.parent
    records = []
    for i, item in enumerate(raw):
        rid = item.get("id", i) if isinstance(item, dict) else i
        if not isinstance(item, dict):  # reported (or skipped) when encoded, like every other bad record
            records.append(Record(id=rid, messages=[], problem=f"is not an object, got {_kind(item)}"))
            continue
        messages, images, problem = _structure(item)
        meta = {k: v for k, v in item.items() if k not in _STRUCTURAL}
        records.append(Record(id=rid, messages=messages, images=[str(root / p) for p in images], problem=problem,
                              meta=meta))
    return records


def merge_data_files(out: str | Path, inputs: Sequence[str | Path]) -> Path:
    """One data file from several (e.g. ``fovea synth`` runs made in parallel): image paths rewritten against
    ``out``'s folder, ids prefixed with their file's folder name so they stay unique."""
    out = Path(out)
    merged = []
    for source in map(Path, inputs):
        if not source.is_file():
            raise ValueError(f"data file {str(source)!r} does not exist")
        for item in json.loads(source.read_text()):
            item = dict(item)
            for key in ("image", "images"):
                if isinstance(item.get(key), str):
                    item[key] = _relocated(item[key], source.parent, out.parent)
                elif isinstance(item.get(key), list):
                    item[key] = [_relocated(p, source.parent, out.parent) for p in item[key]]
            item["id"] = f"{source.parent.name}/{item.get('id', len(merged))}"
            merged.append(item)
    out.write_text(json.dumps(merged, indent=1))
    return out


def _relocated(path: str, source: Path, target: Path) -> str:
    import os

    return os.path.relpath((source / path).resolve(), target.resolve())


def encode_record(record: Record, processor: Any, pages: dict | None = None) -> Sample:
    """Tokenise a conversation with the model's chat template and processor: images preprocessed, placeholders
    expanded, labels on assistant turns only (IGNORE_INDEX elsewhere). ``pages``: prepared images by path, filled
    and reused (several questions about one page read and resize it once)."""
    if record.problem:
        raise DataError(record.id, record.problem)
    messages = record.messages
    if not messages or not any(m.get("role") == "assistant" and str(m.get("content", "")).strip() for m in messages):
        raise DataError(record.id, "the conversation has no answer (no non-empty assistant turn)")
    for m in messages:
        if m.get("role") not in ("user", "assistant", "system"):
            raise DataError(record.id, f"unknown role {m.get('role')!r} (expected human/gpt or user/assistant)")
    pages = {} if pages is None else pages
    for p in record.images:
        if p not in pages:
            page = load_page(p, processor, record.id)
            try:
                pages[p] = processor.image_processor(page)
            except ValueError as err:
                raise DataError(record.id, f"cannot be prepared: {err}") from None
    images = [pages[p] for p in record.images]
    try:  # the model's own processor: images, chat template, placeholder expansion, instructions
        prompt = processor(messages, images, add_generation_prompt=False)
    except ValueError as err:
        raise DataError(record.id, f"cannot be prepared: {err}") from None
    ids, labels = _answer_labels(prompt.messages, processor.tokenizer, record.id)  # (L0,), (L0,) unexpanded
    repeats = processor.repeats(ids, prompt.num_visual_tokens)  # (L0,)
    if not torch.equal(ids.repeat_interleave(repeats), prompt.input_ids):
        raise DataError(record.id, "the chat template renders the conversation differently prefix by prefix")
    label_ids = labels.repeat_interleave(repeats)  # (L,)
    label_ids[prompt.input_ids == processor.image_token_id] = IGNORE_INDEX
    return Sample(input_ids=prompt.input_ids, labels=label_ids, images=[p.pixels for p in prompt.images],
                  instructions=prompt.instructions, visual_tokens=prompt.num_visual_tokens,
                  image_sizes=[p.original_size for p in prompt.images], id=record.id)


def load_page(path: str, processor: Any, record_id: Any) -> Any:
    """An image path, or ``file.pdf#page=N`` / ``scan.tif#page=N`` (one page of a document, rendered at the side the
    model's encoder reads)."""
    file, _, page = path.partition("#page=")
    if not Path(file).is_file():
        raise DataError(record_id, f"image file {file!r} does not exist")
    with open(file, "rb") as fh:
        kind = sniff(fh.read(1024))
    if kind == "image" and not page:
        return file
    if not page:
        raise DataError(record_id, f"{file!r} is a {kind.upper()}: name one page, e.g. {file}#page=1")
    try:
        side = processor.image_processor.cfg.max_side
        return open_document(file, pages=page, max_pages=1, target_side=side).pages[0]
    except ValueError as err:
        raise DataError(record_id, str(err)) from None


def _answer_labels(messages: list[dict], tokenizer: Any, record_id: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the templated conversation and labels that keep only the assistant turns' tokens after their
    role header. Each message's tokens are the difference between the templates of successive prefixes."""
    ids: list[int] = []
    labels: list[int] = []
    for k in range(1, len(messages) + 1):
        text = tokenizer.apply_chat_template(messages[:k], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(ids)] != ids:
            raise DataError(record_id, "the chat template does not render conversations prefix by prefix")
        new = full[len(ids):]
        if messages[k - 1]["role"] == "assistant":
            # The role header the template opens the turn with is prompt, not answer: learn only what follows it.
            head = tokenizer(tokenizer.apply_chat_template(messages[: k - 1], tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]
            skip = len(head) - len(ids) if full[: len(head)] == head and len(head) >= len(ids) else 0
            labels += [IGNORE_INDEX] * skip + new[skip:]
        else:
            labels += [IGNORE_INDEX] * len(new)
        ids = full
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@dataclass
class Dataset:
    """Encoded samples of a data file; ``skipped`` lists (id, reason) of records left out under ``on_bad='skip'``."""

    samples: list[Sample]
    skipped: list[tuple[Any, str]]
    records: list[Record]  # the record each sample came from, index for index


def load_dataset(
    path: str | Path, processor: Any, *, on_bad: str = "stop", max_len: int | None = None,
    report: Callable[[str], None] = say, transform: Callable[[Sample], Sample] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Read and encode every record. ``on_bad``: 'stop' raises the first DataError, 'skip' reports each bad record
    (id and reason) and goes on. Conversations longer than ``max_len`` tokens count as bad records. ``transform``
    is applied to each sample as it is made (the trainer's feature cache swaps pixels for encoder features there,
    so a large dataset's pages are never all in memory); ``progress(done, total)`` after each record."""
    if on_bad not in ("stop", "skip"):
        raise ValueError(f"on_bad must be 'stop' or 'skip', got {on_bad!r}")
    samples, skipped, records = [], [], []
    all_records = read_records(path)
    pages: dict = {}  # the last record's prepared pages: a page's questions come one after another
    for done, record in enumerate(all_records, start=1):
        try:
            if set(record.images) - set(pages):
                pages.clear()
            sample = encode_record(record, processor, pages)
            if max_len is not None and len(sample) > max_len:
                raise DataError(record.id, f"{len(sample)} tokens, over the maximum sequence length {max_len}")
            samples.append(transform(sample) if transform is not None else sample)
            records.append(record)
        except DataError as err:
            if on_bad == "stop":
                raise
            skipped.append((err.record_id, err.reason))
            report(f"fovea: skipping {err}")
        if progress is not None:
            progress(done, len(all_records))
    if not samples:
        raise ValueError(f"no usable records in {str(path)!r} ({len(skipped)} skipped)")
    return Dataset(samples=samples, skipped=skipped, records=records)


def split_ids(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out split of sample indices."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=g).tolist()
    n_eval = int(round(len(samples) * fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])
