"""Rendered text with exact ground truth for the reading curriculum: single field lines and multi-line page crops
(paragraphs, forms, tables) at the pixel scale the reader sees, with scan degradations.

Every sample is a pure function of its seed: the same seed gives the same pixels and the same labels. A label is a
*run*: one horizontal piece of text as drawn, with its pixel box in the crop. Degradations move pixels by at most
about one pixel, so the boxes stay true.

Notation: H x W crop pixels; a box is (x0, y0, x1, y1) in crop pixels, x1/y1 exclusive.
"""

from __future__ import annotations

import io
import random
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")
# The reader's alphabet: printable ASCII. Index 0 of the CTC vocabulary is the blank, so char i -> i + 1.
CHARSET = "".join(chr(c) for c in range(32, 127))
LAYOUTS = ("line", "paragraph", "form", "table")

_WORDS = (
    "agreement supplier client party parties shall payment invoice total amount due date term notice termination "
    "confidential information services monthly fee written consent liability contract year delivery order "
    "quantity unit price tax subtotal balance account number reference description period effective governed "
    "laws address registered mail records audit prior reasonable control events delay rights assign obligations "
    "schedule annex section clause signature witness approved received issued pursuant hereby thereof whereas"
).split()
_SURNAMES = ("Aldermoor Brightwater Cobalt Dunmore Eastgate Fernhill Granite Harbourline Ivers Jansen Kowalski "
             "Lindqvist Moreau Nakamura Okafor Petrov Quist Rossi Svensson Tanaka Ueda Valdez Whitfield Young Zeller")
_SUFFIXES = ("Ltd.", "GmbH", "Inc.", "LLP", "S.A.", "B.V.", "Co.", "AG", "plc", "Holdings")
_KEYS = ("Invoice No.", "Order No.", "Agreement No.", "Date", "Due Date", "Total", "Subtotal", "VAT", "Amount Due",
         "Account", "IBAN", "Reference", "Customer ID", "Notice Period", "Term", "Phone", "Contact", "PO Number")
_MONTHS = ("January February March April May June July August September October November December").split()


@dataclass
class TextSample:
    image: Image.Image  # the crop, RGB, H x W
    runs: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # (text, box) per drawn run
    fields: list[bool] = field(default_factory=list)  # per run: is it a whole field value (amount, date, ID, name)


@lru_cache(maxsize=1)
def available_fonts() -> tuple[str, ...]:
    """Font file names (DejaVu families) the renderer can use on this machine."""
    names = set()
    for folder in FONT_DIRS:
        path = Path(folder)
        if path.is_dir():
            names |= {p.name for p in path.glob("DejaVu*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name}
    return tuple(sorted(names))


def check_fonts(fonts: tuple[str, ...] | None) -> tuple[str, ...]:
    """The fonts to draw with: ``fonts`` (names from ``available_fonts()``) or every available one."""
    have = available_fonts()
    if not have:
        raise ValueError(f"no DejaVu fonts found in {FONT_DIRS}; install fonts-dejavu-core")
    if not fonts:
        return have
    missing = [f for f in fonts if f not in have]
    if missing:
        raise ValueError(f"font(s) {missing} do not exist on this machine; available: {list(have)}")
    return tuple(fonts)


@lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    for folder in FONT_DIRS:
        path = Path(folder) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    raise ValueError(f"font {name!r} does not exist in {FONT_DIRS}")


# ----- text content -------------------------------------------------------------------------------------------------
def _amount(rng: random.Random) -> str:
    value = rng.randint(0, 10 ** rng.randint(1, 7)) + rng.randint(0, 99) / 100
    body = f"{value:,.2f}" if rng.random() < 0.7 else f"{value:.2f}"
    if rng.random() < 0.2:  # European grouping
        body = body.replace(",", "_").replace(".", ",").replace("_", ".")
    cur = rng.choice(("EUR ", "USD ", "$", "GBP ", "CHF ", ""))
    return cur + body if rng.random() < 0.8 else body + " " + rng.choice(("EUR", "USD", "GBP"))


def _date(rng: random.Random) -> str:
    d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1990, 2035)
    return rng.choice((f"{d:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y % 100:02d}",
                       f"{_MONTHS[m - 1]} {d}, {y}", f"{d} {_MONTHS[m - 1][:3]} {y}"))


def _ident(rng: random.Random) -> str:
    pool = string.ascii_uppercase + string.digits
    parts = [rng.choice(("INV", "PO", "SA", "REF", "ACC", "ORD", "CN", "")), *(
        "".join(rng.choice(pool if rng.random() < 0.5 else string.digits) for _ in range(rng.randint(2, 6)))
        for _ in range(rng.randint(1, 3)))]
    return rng.choice(("-", "/", " ", "")).join(p for p in parts if p)


def _name(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(_SURNAMES.split())} {rng.choice(_WORDS).title()} {rng.choice(_SUFFIXES)}"
    return f"{rng.choice(string.ascii_uppercase)}. {rng.choice(_SURNAMES.split())}"


def _random_chars(rng: random.Random) -> str:
    # Letters with no language behind them: the encoder must read glyphs, not guess words.
    return "".join(rng.choice(CHARSET[1:]) if rng.random() < 0.85 else " " for _ in range(rng.randint(3, 24))).strip()


def _words(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        w = rng.choice(_WORDS)
        r = rng.random()
        w = w.title() if r < 0.25 else w.upper() if r < 0.3 else w
        if rng.random() < 0.12:
            w += rng.choice(",.;:")
        if rng.random() < 0.08:
            w = str(rng.randint(1, 999))
        out.append(w)
    return " ".join(out)


_FIELD_KINDS = (_amount, _date, _ident, _name)


def _field(rng: random.Random) -> tuple[str, bool]:
    r = rng.random()
    if r < 0.6:
        return rng.choice(_FIELD_KINDS)(rng), True
    if r < 0.75:
        return _random_chars(rng), False
    return _words(rng, rng.randint(1, 6)), False


# ----- drawing ------------------------------------------------------------------------------------------------------
def _fit(text: str, fnt: ImageFont.FreeTypeFont, max_width: int) -> str:
    """The longest prefix of ``text`` (cut at a character, trailing spaces dropped) that fits ``max_width``."""
    while text and fnt.getlength(text) > max_width:
        text = text[: max(1, int(len(text) * max_width / max(fnt.getlength(text), 1))) - 1]
    return text.rstrip()


class _Canvas:
    """A crop being drawn: it records each run's text and ink box."""

    def __init__(self, rng: random.Random, height: int, width: int) -> None:
        self.rng = rng
        self.height, self.width = height, width
        paper = rng.randint(215, 255)
        tint = [max(0, paper - rng.randint(0, 18)) for _ in range(3)]
        self.image = Image.new("RGB", (width, height), tuple(tint))
        self.draw = ImageDraw.Draw(self.image)
        dark = rng.randint(0, 80)
        self.ink = (dark, dark, dark) if rng.random() < 0.7 else (rng.randint(0, 60), rng.randint(0, 60),
                                                                  rng.randint(60, 140))
        self.runs: list[tuple[str, tuple[int, int, int, int]]] = []
        self.fields: list[bool] = []

    def text(self, x: int, y: int, text: str, fnt: ImageFont.FreeTypeFont, is_field: bool) -> int:
        """Draw ``text`` with its top-left at (x, y) if it fits in the crop; returns the right edge (x if skipped)."""
        text = _fit(text.strip(), fnt, self.width - x - 2)
        if not text.strip():
            return x
        box = self.draw.textbbox((x, y), text, font=fnt)
        if box[3] > self.height - 1 or box[1] < 1:
            return x
        self.draw.text((x, y), text, font=fnt, fill=self.ink)
        self.runs.append((text, (box[0], box[1], box[2], box[3])))
        self.fields.append(is_field)
        return box[2]


def _layout_line(c: _Canvas, fonts, sizes) -> None:
    fnt = load_font(c.rng.choice(fonts), c.rng.randint(*sizes))
    text, is_field = _field(c.rng)
    top, bottom = fnt.getbbox("Ag")[1], fnt.getbbox("Ag")[3]
    y = (c.height - (bottom - top)) // 2 - top + c.rng.randint(-2, 2)
    c.text(c.rng.randint(2, 24), y, text, fnt, is_field)


def _layout_lines(c: _Canvas, fonts, sizes, make) -> None:
    """Lines top to bottom until the crop is full; ``make(y, fnt)`` draws one line."""
    y = c.rng.randint(-4, 8)
    while True:
        size = c.rng.randint(*sizes)
        fnt = load_font(c.rng.choice(fonts), size)
        if y + size * 1.3 > c.height:
            return
        make(y, fnt)
        y += int(size * c.rng.uniform(1.25, 1.7))


def _layout_paragraph(c: _Canvas, fonts, sizes) -> None:
    x = c.rng.randint(2, 30)
    _layout_lines(c, fonts, sizes, lambda y, fnt: c.text(x, y, _words(c.rng, 14), fnt, False))


def _layout_form(c: _Canvas, fonts, sizes) -> None:
    x = c.rng.randint(2, 30)

    def line(y, fnt):
        right = c.text(x, y, c.rng.choice(_KEYS) + ":", fnt, False)
        if right > x:
            value, is_field = _field(c.rng)
            c.text(right + c.rng.randint(int(fnt.size * 0.4), 3 * fnt.size), y, value, fnt, is_field)

    _layout_lines(c, fonts, sizes, line)


def _layout_table(c: _Canvas, fonts, sizes) -> None:
    cols = c.rng.randint(2, 4)
    edges = sorted(c.rng.sample(range(4, c.width - 40), cols))
    edges = [edges[0]] + [e for a, e in zip(edges, edges[1:], strict=False) if e - a > 40]

    def row(y, fnt):
        for i, x in enumerate(edges):
            limit = edges[i + 1] - 8 if i + 1 < len(edges) else c.width
            value, is_field = _field(c.rng)
            value = _fit(value, fnt, limit - x)
            c.text(x, y, value, fnt, is_field)

    _layout_lines(c, fonts, sizes, row)


_LAYOUT_FNS = {"line": _layout_line, "paragraph": _layout_paragraph, "form": _layout_form, "table": _layout_table}


def scan_damage(image: Image.Image, rng: random.Random, strength: float, rotate: float = 0.0) -> Image.Image:
    """Scan and photo damage that keeps text where it was: a slight skew (at most ``rotate`` degrees, about the
    centre: a 512 px crop's ends move by under 2 px at 0.4 degrees), resolution loss, blur, uneven light, noise,
    JPEG."""
    if strength <= 0:
        return image
    if rotate > 0:  # its own generator: runs with rotate=0 draw exactly the crops they drew before it existed
        angle = random.Random(rng.random()).uniform(-rotate, rotate)
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=image.getpixel((0, 0)))
    if rng.random() < 0.5 * strength:  # scanned at a lower resolution, then resized back
        w, h = image.size
        f = rng.uniform(0.6, 0.9)
        image = image.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BICUBIC)
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    if rng.random() < 0.4 * strength:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    arr = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5 * strength:  # light falling off across the page
        h, w = arr.shape[:2]
        ramp = np.linspace(1.0, rng.uniform(0.7, 1.0), w if rng.random() < 0.5 else h, dtype=np.float32)
        arr = arr * (ramp[None, :, None] if len(ramp) == w else ramp[:, None, None])
    if rng.random() < 0.5 * strength:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 14), arr.shape[:2])
        arr = arr + noise[..., None]
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5 * strength:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=rng.randint(35, 92))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


def render_text(seed: int, *, layout: str, height: int, width: int, sizes: tuple[int, int] = (10, 24),
                fonts: tuple[str, ...] | None = None, degrade: float = 1.0, rotate: float = 0.0) -> TextSample:
    """One crop of ``height`` x ``width`` px in ``layout`` ("line", "paragraph", "form", "table"), text heights in
    ``sizes`` px (font size), drawn with ``fonts`` (default: all DejaVu faces), damaged with probability scale
    ``degrade`` (0 = clean) and skewed by up to ``rotate`` degrees."""
    if not 0.0 <= rotate <= 2.0:
        raise ValueError(f"rotate {rotate} must be in [0, 2] degrees: more moves text out of its labelled box")
    if layout not in _LAYOUT_FNS:
        raise ValueError(f"unknown layout {layout!r}; available: {LAYOUTS}")
    if not 4 <= sizes[0] <= sizes[1] <= height:
        raise ValueError(f"text sizes {sizes} must satisfy 4 <= min <= max <= crop height {height}")
    fonts = check_fonts(fonts)
    rng = random.Random(seed)
    canvas = _Canvas(rng, height, width)
    _LAYOUT_FNS[layout](canvas, fonts, sizes)
    return TextSample(scan_damage(canvas.image, rng, degrade, rotate), canvas.runs, canvas.fields)


def encode_text(text: str) -> list[int]:
    """CTC targets: char -> index in CHARSET + 1 (0 is the blank)."""
    return [CHARSET.index(ch) + 1 for ch in text]


def decode_ids(ids: list[int]) -> str:
    return "".join(CHARSET[i - 1] for i in ids if 0 < i <= len(CHARSET))
