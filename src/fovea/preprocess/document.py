"""Documents as users have them: PDF (rendered with pypdfium2), multi-frame TIFF, or a single image, opened into a
list of page images under page and pixel limits, checked before any model work.

A PDF page is rendered at the resolution the encoder will read (its long side at ``target_side`` pixels), so the
page is never rendered small and upscaled, nor rendered huge and thrown away; ``dpi`` fixes the resolution instead.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageSequence, UnidentifiedImageError

from fovea.config import DEFAULT_MAX_PIXELS
from fovea.preprocess.image import check_pixels, load_image

DEFAULT_MAX_PAGES = 16  # pages one question may read (each page costs its own encode and visual tokens)
PDF_MAGIC, TIFF_MAGICS = b"%PDF", (b"II*\x00", b"MM\x00*")


@dataclass
class Document:
    """Page images in reading order, with where they came from."""

    name: str  # the file name (or "upload") for messages and markers
    kind: str  # "pdf", "tiff" or "image"
    pages: list[Image.Image] = field(default_factory=list)  # RGB page images, in reading order
    numbers: list[int] = field(default_factory=list)  # 1-based page number of each image in the source
    total_pages: int = 0  # pages in the source, selected or not

    @property
    def pixels(self) -> int:
        return sum(p.width * p.height for p in self.pages)


def parse_pages(spec: str | None, total: int) -> list[int]:
    """``"1-3,7"`` -> [1, 2, 3, 7] (1-based, in the order given, duplicates dropped); None -> every page. A page
    outside 1..total or a malformed range is a ValueError naming it."""
    if spec is None or str(spec).strip() in ("", "all"):
        return list(range(1, total + 1))
    out: list[int] = []
    for part in str(spec).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"page selection {spec!r}: {part.strip()!r} is not a page or range such as 2 or 1-3")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first < 1 or last < first:
            raise ValueError(f"page selection {spec!r}: {part.strip()!r} is not an increasing range of pages >= 1")
        if last > total:
            raise ValueError(f"page selection {spec!r}: page {last} is out of range, the document has {total} "
                             f"page{'s' if total != 1 else ''}")
        out += [p for p in range(first, last + 1) if p not in out]
    return out


def sniff(data: bytes) -> str:
    """The kind of a file from its first bytes: "pdf", "tiff" or "image"."""
    if data[:4] == PDF_MAGIC or data[:1024].lstrip().startswith(PDF_MAGIC):
        return "pdf"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    return "image"


def open_document(source: Any, *, pages: str | None = None, max_pages: int = DEFAULT_MAX_PAGES,
                  max_pixels: int = DEFAULT_MAX_PIXELS, target_side: int = 1536, dpi: float | None = None,
                  name: str | None = None) -> Document:
    """A document from a path, raw bytes or a PIL image. ``pages``: a selection such as "1-3,7" (default all);
    more selected pages than ``max_pages`` is an error, as is any page over ``max_pixels``. Missing, empty,
    corrupt, truncated or encrypted files are ValueErrors naming the file; nothing is rendered before the page
    count and sizes are known to fit."""
    data, label = _read(source, name)
    if data is None:  # a PIL image or an array: one page
        image = load_image(source, max_pixels=max_pixels)
        return Document(name=label, kind="image", pages=[image], numbers=[1], total_pages=1)
    kind = sniff(data)
    if kind == "pdf":
        return _open_pdf(data, label, pages, max_pages, max_pixels, target_side, dpi)
    if kind == "tiff":
        return _open_tiff(data, label, pages, max_pages, max_pixels)
    parse_pages(pages, 1)
    image = load_image(source if isinstance(source, str | os.PathLike) else data, max_pixels=max_pixels)  # errors
    # name the file when there is one
    return Document(name=label, kind="image", pages=[image], numbers=[1], total_pages=1)


def _read(source: Any, name: str | None) -> tuple[bytes | None, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ValueError(f"document {name or 'upload'!r} is empty (0 bytes)")
        return bytes(source), name or "upload"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"document file {str(path)!r} does not exist")
        data = path.read_bytes()
        if not data:
            raise ValueError(f"document file {str(path)!r} is empty (0 bytes)")
        return data, name or str(path)
    return None, name or type(source).__name__


def _check_count(selected: list[int], max_pages: int, label: str) -> None:
    if len(selected) > max_pages:
        raise ValueError(f"document {label!r}: {len(selected)} pages selected, the limit is {max_pages} pages per "
                         "question (choose pages, e.g. --pages 1-3)")


def _open_pdf(data: bytes, label: str, pages: str | None, max_pages: int, max_pixels: int, target_side: int,
              dpi: float | None) -> Document:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as err:
        reason = str(err)
        if "password" in reason.lower():
            raise ValueError(f"PDF {label!r} is encrypted: fovea reads unencrypted PDFs (remove the password "
                             "first)") from None
        raise ValueError(f"PDF {label!r} is corrupt or truncated: {reason}") from None
    try:
        total = len(pdf)
        if total == 0:
            raise ValueError(f"PDF {label!r} has no pages")
        selected = parse_pages(pages, total)
        _check_count(selected, max_pages, label)
        scales = []
        for number in selected:  # sizes first, from the page boxes: nothing is rendered if any page is too big
            width_pt, height_pt = pdf[number - 1].get_size()
            scale = dpi / 72 if dpi else target_side / max(width_pt, height_pt, 1e-6)
            w, h = max(1, round(width_pt * scale)), max(1, round(height_pt * scale))
            try:
                check_pixels(w, h, max_pixels)
            except ValueError as err:
                raise ValueError(f"PDF {label!r} page {number}: {err}") from None
            scales.append(scale)
        images = [pdf[n - 1].render(scale=s).to_pil().convert("RGB") for n, s in zip(selected, scales, strict=True)]
    finally:
        pdf.close()
    return Document(name=label, kind="pdf", pages=images, numbers=selected, total_pages=total)


def _open_tiff(data: bytes, label: str, pages: str | None, max_pages: int, max_pixels: int) -> Document:
    try:
        tiff = Image.open(io.BytesIO(data))
        total = getattr(tiff, "n_frames", 1)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"TIFF {label!r} is corrupt or truncated: {err}") from None
    selected = parse_pages(pages, total)
    _check_count(selected, max_pages, label)
    images = []
    for index, frame in enumerate(ImageSequence.Iterator(tiff), start=1):
        if index not in selected:
            continue
        try:
            check_pixels(frame.width, frame.height, max_pixels)
            images.append((index, frame.convert("RGB")))
        except ValueError as err:
            raise ValueError(f"TIFF {label!r} page {index}: {err}") from None
        except (OSError, SyntaxError) as err:
            raise ValueError(f"TIFF {label!r} page {index} is corrupt or truncated: {err}") from None
    order = {n: i for i, n in enumerate(selected)}
    images.sort(key=lambda item: order[item[0]])
    return Document(name=label, kind="tiff", pages=[im for _, im in images], numbers=selected, total_pages=total)


def document_messages(document: Document, question: str) -> list[dict]:
    """One user turn asking ``question`` about every page: "Page N:" markers (the source's page numbers) before
    each page's image, in reading order; a single image gets no marker."""
    content: list[dict] = []
    for number in document.numbers:
        if len(document.pages) > 1 or document.kind != "image":
            content.append({"type": "text", "text": f"Page {number}:"})
        content.append({"type": "image"})
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]
