"""Documents as people have them, drawn with exact ground truth, and questions about them.

Nine kinds (invoice, purchase order, contract, lease, form, letter, receipt, statement, table), each page a random
composition of blocks (header, labelled fields, an item table, numbered clauses, yes/no boxes, letter paragraphs, a
signature) in random order and style: label wordings, field layouts (``Label: value``, aligned columns, boxed
cells, ruled grids), fonts, sizes, ink, portrait or landscape, 2880x2160 or 4K, with scan damage. Every question's
answer is the exact string drawn on the page, except "absent" questions (a field of the kind that this page does
not carry, or one only another kind has), whose reference is ``REFUSAL``.

``split="heldout"`` draws with label wordings, question wordings, fonts and field layouts that ``split="train"``
never uses (the last variant of each is kept out of training), so an evaluation can ask about unseen templates.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from fovea.data.document_kinds import (
    CHECKS,
    CLAUSES,
    CURRENCIES,
    FIELDS,
    ITEMS,
    KINDS,
    QUESTION_KINDS,
    REFUSAL,
    SPLITS,
    UNIQUE,
    Ctx,
    Fact,
    FieldSpec,
    date_value,
    variants,
)
from fovea.data.reading import available_fonts, load_font, scan_damage

__all__ = ["KINDS", "QUESTION_KINDS", "REFUSAL", "SPLITS", "Document", "pick_questions", "render_document",
           "write_documents"]


@dataclass
class Document:
    image: Image.Image  # the page, RGB
    kind: str  # the document kind
    facts: list[Fact] = field(default_factory=list)  # what the page answers, one wording each
    absent: list[Fact] = field(default_factory=list)  # questions the page does not answer (answer ``REFUSAL``)


# ----- drawing ----------------------------------------------------------------------------------------------------
FAMILIES = ("DejaVuSans", "DejaVuSerif", "DejaVuSansCondensed", "DejaVuSerifCondensed")  # the last is held out
FIELD_STYLES = ("colon", "aligned", "two_column", "boxes", "grid")  # field layouts; the last is held out
_INKS = ((0, 0, 0), (25, 25, 70), (45, 45, 45), (10, 40, 100))
_PAPERS = ((255, 255, 255), (250, 248, 240), (244, 246, 250), (255, 253, 245))
_FILLER = ("This document is issued subject to the general terms of business, available on request. Amounts are "
           "stated without prejudice to any rights arising under applicable law. Please retain this copy for your "
           "records and quote the reference above in all correspondence.")
# Sentences that answer nothing: the text around the facts, as on a real page.
_PROSE = ("We refer to our recent correspondence and the meeting held at your offices.",
          "Thank you for your continued cooperation over the past year.",
          "Our records have been updated to reflect the changes you requested.",
          "Should you have any questions, our team will be pleased to assist you.",
          "A copy of this document has been filed with our accounts department.",
          "Please review the details carefully and let us know of any discrepancy.",
          "The arrangements described here replace any earlier informal understanding.",
          "We look forward to working with you on the next phase of the project.",
          "All figures are subject to final confirmation by the finance team.",
          "Kindly sign and return the enclosed copy at your earliest convenience.")


class Sheet:
    """A page drawn top to bottom: its fonts, text scale, margins and the cursor ``y``. Layouts are designed for a
    2160 px short side and scaled, with a random text size factor."""

    def __init__(self, width: int, height: int, rng: random.Random, split: str) -> None:
        self.rng = rng
        self.image = Image.new("RGB", (width, height), rng.choice(_PAPERS))
        self.draw = ImageDraw.Draw(self.image)
        short = min(width, height) / 2160
        self.unit = short * rng.uniform(0.85, 1.2)  # text scale
        self.margin = int(rng.uniform(110, 200) * short)
        self.y = self.margin
        self.family = rng.choice(variants(FAMILIES, split))
        self.ink = rng.choice(_INKS)
        self.body = rng.randint(30, 40)  # body text size at unit 1 (8-11 pt on a 2160 px high A4 scan)

    @property
    def width(self) -> int:
        return self.image.width - 2 * self.margin

    def px(self, base: float) -> int:
        return max(9, int(base * self.unit))

    def font(self, base: float, bold: bool = False) -> ImageFont.FreeTypeFont:
        return _face(self.family, bold, self.px(base))

    def text(self, x: float, y: float, s: str, base: float | None = None, bold: bool = False,
             fill: tuple[int, int, int] | None = None) -> None:
        self.draw.text((int(x), int(y)), s, font=self.font(base or self.body, bold), fill=fill or self.ink)

    def length(self, s: str, base: float | None = None, bold: bool = False) -> int:
        return int(self.draw.textlength(s, font=self.font(base or self.body, bold)))

    def line(self, base: float | None = None) -> int:
        return int(self.px(base or self.body) * 1.45)

    def fits(self, height: int) -> bool:
        return self.y + height <= self.image.height - self.margin

    def wrap(self, text: str, base: float | None = None, width: int | None = None) -> list[str]:
        width = width or self.width
        lines, current = [], ""
        for word in text.split():
            trial = f"{current} {word}".strip()
            if current and self.length(trial, base) > width:
                lines.append(current)
                current = word
            else:
                current = trial
        return lines + ([current] if current else [])

    def box(self, box: tuple[float, float, float, float], width: int = 2) -> None:
        self.draw.rectangle(tuple(int(v) for v in box), outline=self.ink, width=max(1, int(width * self.unit)))


@lru_cache(maxsize=256)
def _face(family: str, bold: bool, size: int) -> ImageFont.FreeTypeFont:
    name = f"{family}-Bold.ttf" if bold else f"{family}.ttf"
    return load_font(name, size) if name in available_fonts() else ImageFont.load_default(size=size)


def _header(s: Sheet, title: str, issuer: str | None) -> None:
    """The title (left, centred or right) and, on the other side, the issuer's name."""
    big = s.rng.randint(52, 76)
    align = s.rng.choice(("left", "center", "right"))
    x = {"left": s.margin, "center": s.margin + (s.width - s.length(title, big, True)) / 2,
         "right": s.margin + s.width - s.length(title, big, True)}[align]
    if title:
        s.text(x, s.y, title, big, bold=True)
    if issuer:
        ix = s.margin if align == "right" else s.margin + s.width - s.length(issuer, s.body + 4, True)
        s.text(ix, s.y + (s.line(big) if align == "center" else 0), issuer, s.body + 4, bold=True)
    s.y += s.line(big) * (2 if align == "center" and issuer else 1) + s.line()


def _fields(s: Sheet, items: list[tuple[FieldSpec, str, str]], style: str, doc: Document, split: str) -> None:
    """Labelled values in one of ``FIELD_STYLES``; each drawn value becomes a "field" fact."""
    if not items:
        return
    cols = {"colon": 1, "aligned": 1, "two_column": 2, "boxes": s.rng.choice((2, 3)), "grid": 1}[style]
    rows = -(-len(items) // cols)
    row_h = s.line() * (2 if style == "boxes" else 1) + (int(18 * s.unit) if style in ("boxes", "grid") else 0)
    if not s.fits(rows * row_h):
        return
    col_w = s.width / cols
    label_w = max(s.length(label + ":", bold=True) for _, label, _ in items) + int(30 * s.unit)
    for i, (spec, label, value) in enumerate(items):
        x, y = s.margin + (i % cols) * col_w, s.y + (i // cols) * row_h
        if style in ("colon", "two_column"):
            s.text(x, y, f"{label}: {value}")
        elif style == "aligned":
            s.text(x, y, label + ":", bold=True)
            s.text(x + label_w, y, value)
        elif style == "boxes":
            s.box((x, y, x + col_w - 20 * s.unit, y + row_h - 10 * s.unit))
            s.text(x + 12 * s.unit, y + 6 * s.unit, label, s.body * 0.7, fill=(90, 90, 90))
            s.text(x + 12 * s.unit, y + s.line(s.body * 0.7) + 6 * s.unit, value)
        else:  # grid: a ruled two-column table
            s.box((x, y, x + label_w + 20 * s.unit, y + row_h))
            s.box((x + label_w + 20 * s.unit, y, s.margin + s.width, y + row_h))
            s.text(x + 10 * s.unit, y + 9 * s.unit, label, bold=True)
            s.text(x + label_w + 32 * s.unit, y + 9 * s.unit, value)
        doc.facts.append(Fact(spec.key, value, s.rng.choice(variants(spec.questions, split)), "field",
                              f"{label}: {value}"))
    s.y += rows * row_h + s.line()


_HEADS = {  # column wordings per table type; the last of each is held out
    "items": (("Item", "Description", "Product", "Article"), ("Qty", "Quantity", "Units", "No. of units"),
              ("Unit price", "Rate", "Price", "Unit cost"), ("Amount", "Line total", "Net", "Sum")),
    "transactions": (("Date", "Booking date", "Value date"), ("Description", "Details", "Narrative"),
                     ("Amount", "Debit/Credit", "Value")),
    "rates": (("Service", "Work type", "Task"),),
}
_TOTALS = ("Total", "TOTAL", "Amount due", "Grand total")
_TABLE_Q = {
    "qty": ("What quantity of {row} is listed?", "How many {row} are on the page?", "What is the quantity for {row}?",
            "How many units of {row} are there?"),
    "total": ("What is the total?", "What is the total amount?", "What is the amount due in total?",
              "What does the table add up to?"),
    "txn": ("What was the amount of the {row} transaction?", "How much was the {row} entry?",
            "What amount is booked for {row}?", "What is the value of the {row} line?"),
    "rate": ("What is the {col} rate for {row}?", "How much does {row} cost at the {col} rate?",
             "What is the {col} price of {row}?", "Give the {col} rate for {row}."),
}
_TRANSACTIONS = ("Salary", "Rent", "Card payment Kestrel Foods", "Transfer to savings", "Electricity", "Insurance",
                 "Interest", "Cash withdrawal", "Refund Marlow Print Works", "Phone bill", "Water", "Parking")
_SERVICES = ("Site survey", "Installation", "Maintenance visit", "Remote support", "Training day", "Data migration",
             "Audit", "Repair", "Consultation", "Delivery", "Setup", "Inspection")
_RATE_COLUMNS = ("Standard", "Express", "Weekend", "Night")


def _table(s: Sheet, ctx: Ctx, kind: str, doc: Document, split: str) -> None:
    """An item, transaction or rate table; every cell asked about is a "table" fact."""
    heads = [s.rng.choice(variants(options, split)) for options in _HEADS[kind]]
    if kind == "rates":
        heads += s.rng.sample(_RATE_COLUMNS, s.rng.randint(2, 3))
    row_h = s.line() + int(16 * s.unit)
    room = (s.image.height - s.margin - s.y) // row_h - 2 - (kind == "items")
    n = min(s.rng.randint(3, 8), room)
    if n < 2:
        return
    rows, facts = _table_rows(s, ctx, kind, heads, n, split)
    widths = [0.4] + [0.6 / (len(heads) - 1)] * (len(heads) - 1)
    ruled = s.rng.random() < 0.6
    for r, row in enumerate([heads] + rows):
        x = s.margin
        for c, value in enumerate(row):
            w = widths[c] * s.width
            if ruled:
                s.box((x, s.y, x + w, s.y + row_h))
            s.text(x + 10 * s.unit, s.y + 8 * s.unit, value, bold=r == 0 or value in _TOTALS)
            x += w
        if not ruled and r == 0:
            s.draw.line((s.margin, s.y + row_h, s.margin + s.width, s.y + row_h), fill=s.ink,
                        width=max(1, int(2 * s.unit)))
        s.y += row_h
    doc.facts += facts
    s.y += s.line()


def _table_rows(s: Sheet, ctx: Ctx, kind: str, heads: list[str], n: int, split: str) -> tuple[list, list[Fact]]:
    ask = {k: variants(v, split) for k, v in _TABLE_Q.items()}
    rows, facts = [], []
    if kind == "items":
        total = 0
        for item in s.rng.sample(ITEMS, n):
            qty, cents = s.rng.randint(1, 400), s.rng.randint(100, 90_000)
            total += qty * cents
            rows.append([item, str(qty), f"{cents / 100:,.2f}", f"{qty * cents / 100:,.2f}"])
            facts.append(Fact(f"qty_{item}", str(qty), s.rng.choice(ask["qty"]).format(row=item), "table",
                              f"{item}, {heads[1]}: {qty}"))
        amount, word = f"{ctx.currency}{total / 100:,.2f}", s.rng.choice(_TOTALS)
        rows.append(["", "", word, amount])
        facts.append(Fact("total", amount, s.rng.choice(ask["total"]), "table", f"{word}: {amount}"))
    elif kind == "transactions":
        for what in s.rng.sample(_TRANSACTIONS, n):
            amount = f"{s.rng.choice('-+')}{s.rng.randint(5, 9_000):,}.{s.rng.randint(0, 99):02d}"
            rows.append([date_value(ctx), what, amount])
            facts.append(Fact(f"txn_{what}", amount, s.rng.choice(ask["txn"]).format(row=what), "table",
                              f"{what}: {amount}"))
    else:
        for service in s.rng.sample(_SERVICES, n):
            cells = [f"{ctx.currency}{s.rng.randint(20, 3_000):,}.00" for _ in heads[1:]]
            rows.append([service, *cells])
            col = s.rng.randrange(1, len(heads))
            facts.append(Fact(f"rate_{service}_{heads[col]}", cells[col - 1],
                              s.rng.choice(ask["rate"]).format(row=service, col=heads[col]), "table",
                              f"{service}, {heads[col]}: {cells[col - 1]}"))
    return rows, facts


def _clauses(s: Sheet, ctx: Ctx, keys: list[str], doc: Document, split: str, numbered: bool = True) -> None:
    """Numbered clauses (or, in a letter, plain sentences in paragraphs): each answer sits inside a sentence."""
    for number, key in enumerate(keys, start=1):
        clause = CLAUSES[key]
        value = clause.value(ctx)
        heading = s.rng.choice(variants(clause.headings, split))
        sentence = clause.text.format(v=value)
        lines = s.wrap(sentence)
        if not s.fits(s.line() * (len(lines) + numbered) + s.line() // 2):
            return
        if numbered:
            s.text(s.margin, s.y, f"{number}. {heading}", bold=True)
            s.y += s.line()
        for line in lines:
            s.text(s.margin, s.y, line)
            s.y += s.line()
        s.y += s.line() // 2
        doc.facts.append(Fact(key, value, s.rng.choice(variants(clause.questions, split)), "clause",
                              f"{heading}: {sentence}" if numbered else sentence))
    s.y += s.line() // 2


def _checks(s: Sheet, keys: list[str], doc: Document, split: str) -> None:
    """Yes/no boxes, ticked or not, as "[x] Label" or "Label: [ ] Yes [x] No"."""
    side = s.px(s.body * 0.9)
    for key in keys:
        if not s.fits(s.line() + side):
            return
        check = CHECKS[key]
        label, yes = s.rng.choice(variants(check.labels, split)), s.rng.random() < 0.5
        if s.rng.random() < 0.5:
            boxes = [(s.margin, yes, label)]
        else:
            s.text(s.margin, s.y, label + ":")
            x = s.margin + s.length(label + ":") + 30 * s.unit
            boxes = [(x, yes, "Yes"), (x + side + s.length("Yes") + 60 * s.unit, not yes, "No")]
        for x, ticked, word in boxes:
            s.box((x, s.y, x + side, s.y + side), width=3)
            if ticked:
                s.draw.line((x, s.y, x + side, s.y + side), fill=s.ink, width=max(1, int(4 * s.unit)))
                s.draw.line((x, s.y + side, x + side, s.y), fill=s.ink, width=max(1, int(4 * s.unit)))
            s.text(x + side + 16 * s.unit, s.y - 4 * s.unit, word)
        s.y += side + s.line() // 2
        answer = "Yes" if yes else "No"
        doc.facts.append(Fact(key, answer, s.rng.choice(variants(check.questions, split)), "yes/no",
                              f"{label}: {answer}"))
    s.y += s.line() // 2


def _small_print(s: Sheet) -> None:
    lines = s.wrap(_FILLER, s.body * 0.7)
    if s.fits(s.line(s.body * 0.7) * len(lines)):
        for line in lines:
            s.text(s.margin, s.y, line, s.body * 0.7, fill=(90, 90, 90))
            s.y += s.line(s.body * 0.7)
        s.y += s.line()


def _prose(s: Sheet, sentences: int) -> None:
    """A paragraph that answers nothing, drawn only where it fits."""
    lines = s.wrap(" ".join(s.rng.sample(_PROSE, sentences)))
    if s.fits(s.line() * (len(lines) + 1)):
        for line in lines:
            s.text(s.margin, s.y, line)
            s.y += s.line()
        s.y += s.line()


def _signature(s: Sheet, doc: Document, sender: Fact | None, closing: str) -> None:
    """A closing line and, when the sender is a fact, the signed name under it."""
    if not s.fits(s.line() * 3):
        return
    s.text(s.margin, s.y, closing)
    s.y += s.line() * 2
    if sender is not None:
        s.text(s.margin, s.y, sender.answer, bold=True)
        s.y += s.line()
        sender.evidence = f"{closing}\n{sender.answer}"
        doc.facts.append(sender)


# ----- a page ------------------------------------------------------------------------------------------------------
_ISSUERS = {"invoice": "seller", "receipt": "store"}  # fields drawn in the header, as the issuer's name
_CLOSINGS = ("Yours sincerely,", "Kind regards,", "Sincerely,", "Best regards,")


def _values(ctx: Ctx, keys: list[str]) -> dict[str, str]:
    """Values for the page's fields, distinct from each other (a client is not also the provider)."""
    values: dict[str, str] = {}
    for key in keys:
        for _ in range(50):
            value = FIELDS[key].value(ctx)
            if value not in values.values():
                break
        values[key] = value
    return values


def render_document(kind: str, seed: int, *, size: tuple[int, int] = (2880, 2160), split: str = "train",
                    damage: float = 0.7) -> Document:
    """One page of ``kind`` (a key of ``KINDS``) drawn from ``seed`` at ``size`` (width, height): its blocks in a
    random order and style, every fact drawn exactly, then scan damage at ``damage`` (0: clean)."""
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}; available: {sorted(KINDS)}")
    if min(size) < 256:
        raise ValueError(f"page size {size[0]}x{size[1]} is too small for a document (at least 256 px a side)")
    rng = random.Random(seed)
    spec = KINDS[kind]
    ctx = Ctx(rng, rng.choice(CURRENCIES), rng.randrange(5))
    s = Sheet(*size, rng, split)
    doc = Document(s.image, kind)
    keys = list(spec.fields[:spec.required]) + [k for k in spec.fields[spec.required:] if rng.random() < 0.6]
    values = _values(ctx, keys)
    issuer = _ISSUERS.get(kind) if _ISSUERS.get(kind) in values else None
    title = rng.choice(variants(spec.titles, split))
    _header(s, title, values[issuer] if issuer else None)
    if issuer:
        field_spec = FIELDS[issuer]
        doc.facts.append(Fact(issuer, values[issuer], rng.choice(variants(field_spec.questions, split)), "field",
                              f"{title}\n{values[issuer]}" if title else values[issuer]))
    sender = values.pop("sender", None) if spec.letter else None
    items = [(FIELDS[k], rng.choice(variants(FIELDS[k].labels, split)), v) for k, v in values.items() if k != issuer]
    rng.shuffle(items)
    cut = rng.randint((len(items) + 1) // 2, len(items))
    style = rng.choice(variants(FIELD_STYLES, split)) if not spec.letter else rng.choice(("colon", "aligned"))
    _fields(s, items[:cut], style, doc, split)
    clauses = rng.sample(spec.clauses, rng.randint(1, len(spec.clauses))) if spec.clauses else []
    checks = rng.sample(spec.checks, rng.randint(1, len(spec.checks))) if spec.checks else []
    middle: list[Callable[[], None]] = []
    if spec.letter:
        recipient = values.get("recipient")
        s.text(s.margin, s.y, f"Dear {recipient.split()[0] if recipient else 'Sir or Madam'},")
        s.y += s.line() * 2
        middle += [lambda: _prose(s, rng.randint(2, 4)), lambda: _clauses(s, ctx, clauses, doc, split, numbered=False),
                   lambda: _prose(s, rng.randint(1, 3))]
    else:
        if spec.table:
            middle.append(lambda: _table(s, ctx, spec.table, doc, split))
        if clauses:
            middle.append(lambda: _clauses(s, ctx, clauses, doc, split))
        if checks:
            middle.append(lambda: _checks(s, checks, doc, split))
        if rng.random() < 0.5:
            middle.append(lambda: _prose(s, rng.randint(1, 3)))
        rng.shuffle(middle)
        if rng.random() < 0.6:
            middle.append(lambda: _small_print(s))
    for block in middle:
        block()
    _fields(s, items[cut:], style, doc, split)
    if spec.letter:
        question = rng.choice(variants(FIELDS["sender"].questions, split))
        _signature(s, doc, Fact("sender", sender, question, "field") if sender else None, rng.choice(_CLOSINGS))
    doc.absent = _absent(rng, kind, doc, split)
    doc.image = scan_damage(s.image, rng, damage, rotate=0.4) if damage > 0 else s.image
    return doc


def _absent(rng: random.Random, kind: str, doc: Document, split: str) -> list[Fact]:
    """Questions this page does not answer: fields or clauses its kind may carry but this page lacks, and concepts
    only other kinds have."""
    spec, drawn = KINDS[kind], {f.key for f in doc.facts}
    pool = [("field", k) for k in spec.fields if k not in drawn and not (spec.letter and k == "sender")]
    pool += [("clause", k) for k in spec.clauses if k not in drawn]
    pool += [("field", k) for k in rng.sample(UNIQUE, 3) if k not in spec.fields]
    chosen = rng.sample(pool, min(2, len(pool)))
    return [Fact(key, REFUSAL, rng.choice(variants((FIELDS[key] if what == "field" else CLAUSES[key]).questions,
                                                    split)), "absent") for what, key in chosen]


def pick_questions(doc: Document, count: int, rng: random.Random, absent_share: float = 0.15) -> list[Fact]:
    """``count`` questions about ``doc``, spread over question kinds (each kind in turn, a random fact of it), with
    about ``absent_share`` of them questions the page does not answer."""
    by_kind: dict[str, list[Fact]] = {}
    for fact in doc.facts:
        by_kind.setdefault(fact.kind, []).append(fact)
    for facts in by_kind.values():
        rng.shuffle(facts)
    kinds, chosen = list(by_kind), []
    rng.shuffle(kinds)
    absent = list(doc.absent)
    while len(chosen) < count and (any(by_kind.values()) or absent):
        if absent and (rng.random() < absent_share or not any(by_kind.values())):
            chosen.append(absent.pop())
            continue
        kind = kinds[len(chosen) % len(kinds)]
        if by_kind[kind]:
            chosen.append(by_kind[kind].pop())
        else:
            kinds.remove(kind)
    return chosen


# ----- a dataset ---------------------------------------------------------------------------------------------------
PAGE_SIZES = ((2880, 2160), (3840, 2160))  # a 2880x2160 scan and a 4K photo, landscape


def page_size(rng: random.Random, sizes: tuple[tuple[int, int], ...], orientation: str) -> tuple[int, int]:
    """One of ``sizes`` (width, height), turned to portrait always, never, or at random ("any")."""
    if orientation not in ("any", "landscape", "portrait"):
        raise ValueError(f"orientation must be any, landscape or portrait, got {orientation!r}")
    width, height = rng.choice(sizes)
    portrait = orientation == "portrait" or (orientation == "any" and rng.random() < 0.5)
    return (min(width, height), max(width, height)) if portrait else (max(width, height), min(width, height))


def write_documents(out: str | Path, *, num_pages: int, seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS),
                    sizes: tuple[tuple[int, int], ...] = PAGE_SIZES, orientation: str = "any", split: str = "train",
                    questions_per_page: int = 4, damage: float = 0.7, pdf_pages: int = 0, progress=None) -> Path:
    """Render ``num_pages`` pages (``kinds`` in turn) and write ``out/data.json``: one LLaVA conversation record
    per question, with the page's ``kind``, the fact's ``field`` and its ``question_kind``. Deterministic given
    ``seed``. ``pdf_pages`` K > 0 gathers every K pages into one PDF under ``out/docs`` (each question shows the
    whole document, its answer on one page); otherwise each page is a PNG under ``out/images``."""
    import json

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown document kinds {unknown}; available: {sorted(KINDS)}")
    if num_pages < 1 or questions_per_page < 1 or pdf_pages < 0:
        raise ValueError(f"need pages >= 1, questions >= 1 and pdf_pages >= 0, got {num_pages}, "
                         f"{questions_per_page}, {pdf_pages}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = Path(out)
    (out / ("docs" if pdf_pages else "images")).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict] = []
    pending: list[tuple[Document, list[Fact]]] = []
    for i in range(num_pages):
        kind = kinds[i % len(kinds)]
        size = page_size(rng, sizes, orientation)
        doc = render_document(kind, rng.randrange(2**31), size=size, split=split, damage=damage)
        asked = pick_questions(doc, questions_per_page, random.Random(rng.randrange(2**31)))
        if pdf_pages:
            pending.append((doc, asked))
            if len(pending) == pdf_pages or i == num_pages - 1:
                records += _pdf_records(out, len(records), pending)
                pending = []
        else:
            name = f"images/{kind}-{i:05d}.png"
            doc.image.save(out / name)
            records += [_record(f"{kind}-{i:05d}-{j}", name, kind, fact, "<image>\n")
                        for j, fact in enumerate(asked)]
        if progress:
            progress(i + 1, num_pages)
    (out / "data.json").write_text(json.dumps(records, indent=1))
    return out / "data.json"


def _record(rid: str, image: str | list[str], kind: str, fact: Fact, shown: str) -> dict:
    return {"id": rid, "image": image, "kind": kind, "field": fact.key, "question_kind": fact.kind,
            "evidence": fact.evidence,
            "conversations": [{"from": "human", "value": shown + fact.question},
                              {"from": "gpt", "value": fact.answer}]}


def _pdf_records(out: Path, first_id: int, pages: list[tuple[Document, list[Fact]]]) -> list[dict]:
    name = f"docs/doc-{first_id:06d}.pdf"
    images = [doc.image.copy() for doc, _ in pages]  # copies: Pillow's PDF writer must not reuse the objects
    images[0].save(out / name, save_all=True, append_images=images[1:], resolution=200.0)
    shown = "".join(f"Page {n}:\n<image>\n" for n in range(1, len(pages) + 1))
    links = [f"{name}#page={n}" for n in range(1, len(pages) + 1)]
    records = []
    for number, (doc, asked) in enumerate(pages, start=1):
        for fact in asked:
            if fact.kind == "absent":  # another page of the document may hold it: ask only what the pages answer
                continue
            records.append(_record(f"doc-{first_id:06d}-p{number}-{fact.key}", links, doc.kind, fact, shown))
    return records
