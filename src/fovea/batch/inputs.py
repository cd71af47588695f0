"""What a batch run reads: the documents (a folder, a glob or a JSONL manifest) and the questions (a YAML
extraction schema). Everything here is checked before any worker starts."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

DOCUMENT_SUFFIXES = (".pdf", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp", ".bmp")
QUESTION_KEYS = ("fields", "pages", "max_tokens", "max_pages")


@dataclass
class Questions:
    """The extraction schema: field name -> question, asked of every document."""

    fields: dict[str, str]  # field name -> the question whose answer fills it
    pages: str | None = None  # pages of each document to read (e.g. "1-3"); None = all
    max_tokens: int = 64  # answer tokens at most
    max_pages: int = 16  # pages per document at most (more is a recorded error for that document)
    source: str = ""  # the file it came from


def read_questions(path: str | Path) -> Questions:
    """``fields: {name: question}`` (or a plain mapping name -> question), plus optional ``pages``, ``max_tokens``
    and ``max_pages``. An unknown key, an empty schema or a non-string question is a ValueError naming it."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"questions file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"questions file {str(path)!r} is not YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"questions file {str(path)!r} must be a mapping (fields: {{name: question}})")
    if "fields" not in data:  # the short form: the whole file is the schema
        data = {"fields": data}
    unknown = sorted(set(data) - set(QUESTION_KEYS))
    if unknown:
        raise ValueError(f"questions file {str(path)!r}: unknown keys {unknown}; known: {list(QUESTION_KEYS)}")
    fields = data["fields"]
    if not isinstance(fields, dict) or not fields:
        raise ValueError(f"questions file {str(path)!r}: fields must be a non-empty mapping of name -> question")
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"questions file {str(path)!r}: the questions of {bad} are not non-empty strings")
    questions = Questions(fields={str(k): v for k, v in fields.items()}, source=str(path),
                          pages=None if data.get("pages") is None else str(data["pages"]),
                          max_tokens=int(data.get("max_tokens", 64)), max_pages=int(data.get("max_pages", 16)))
    if questions.max_tokens < 1 or questions.max_pages < 1:
        raise ValueError(f"questions file {str(path)!r}: max_tokens and max_pages must be >= 1")
    return questions


def collect_documents(source: str | Path) -> list[str]:
    """The documents of a batch, in a stable order: every document file under a folder (recursively), the files a
    glob matches, or the paths listed in a JSONL manifest (one ``{"path": ...}`` object or JSON string per line,
    relative to the manifest). No documents at all is a ValueError."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        found = _manifest(path)
    elif path.is_file():
        found = [str(path)]
    elif any(c in text for c in "*?["):
        found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
    else:
        raise ValueError(f"input {text!r} does not exist (give a folder, a glob or a JSONL manifest)")
    if not found:
        raise ValueError(f"input {text!r} holds no documents ({', '.join(DOCUMENT_SUFFIXES)})")
    return found


def _manifest(path: Path) -> list[str]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {str(path)!r} cannot be read: {err}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"manifest {str(path)!r} line {number} is not JSON: {err}") from None
        entry = item.get("path") if isinstance(item, dict) else item
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"manifest {str(path)!r} line {number}: expected a path string or {{\"path\": ...}}")
        out.append(str((path.parent / entry) if not Path(entry).is_absolute() else Path(entry)))
    return out
