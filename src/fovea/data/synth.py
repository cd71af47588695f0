"""Synthetic high-resolution document pages rendered with Pillow and the DejaVu fonts, with their ground truth.

Deterministic given a seed: the same seed gives the same pixels and the same facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/local/share/fonts")
_PARTIES = ["Aldermoor Logistics Ltd.", "Brightwater Analytics GmbH", "Cobalt Ridge Holdings", "Dunmore & Pike LLP",
            "Eastgate Medical Supply", "Fernhill Robotics Inc.", "Granite Bay Capital", "Harbourline Shipping Co."]
_CITIES = ["Rotterdam", "Lyon", "Toronto", "Osaka", "Melbourne", "Denver", "Lisbon", "Gdansk"]
_CLAUSES = [
    ("Term", "This Agreement commences on the Effective Date and continues for {n} months unless terminated earlier."),
    ("Fees", "The Client shall pay the Supplier a monthly fee of EUR {amount} within {days} days of each invoice."),
    ("Confidentiality", "Each party shall keep confidential all information disclosed by the other for {n} years."),
    ("Liability", "Total liability of either party shall not exceed EUR {amount} in any contract year."),
    ("Termination", "Either party may terminate this Agreement on {days} days written notice to the other party."),
    ("Governing Law", "This Agreement is governed by the laws applicable in {city}."),
    ("Notices", "Notices shall be delivered in writing to the addresses stated above, or by registered mail."),
    ("Assignment", "Neither party may assign its rights without the prior written consent of the other party."),
    ("Audit", "The Client may audit the Supplier's records once per year with {days} days prior notice."),
    ("Force Majeure", "Neither party is liable for delay caused by events beyond its reasonable control."),
]


@lru_cache(maxsize=32)
def font(size: int, *, bold: bool = False, mono: bool = False) -> ImageFont.ImageFont:
    """A DejaVu font at ``size`` px; Pillow's scalable default font where DejaVu is not installed."""
    name = "DejaVuSansMono" if mono else "DejaVuSerif"
    name += "-Bold.ttf" if bold else ".ttf"
    for folder in FONT_DIRS:
        path = Path(folder) / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _blank(width: int, height: int, seed: int):
    """A white page and what every renderer starts from: its RNG, drawing context, scale unit (layouts are
    designed for 2160 px high pages and scaled), margin and first text line."""
    page = Image.new("RGB", (width, height), "white")
    unit = height / 2160
    return random.Random(seed), page, ImageDraw.Draw(page), unit, int(140 * unit), int(110 * unit)


@dataclass
class Page:
    image: Image.Image  # the rendered page, RGB
    facts: dict[str, str] = field(default_factory=dict)  # ground truth: field name -> exact text on the page


def render_contract(width: int = 2880, height: int = 2160, seed: int = 0) -> Page:
    """A services contract: title, parties, numbered clauses, a fee table and small print, scaled to the page."""
    rng, page, draw, unit, margin, y = _blank(width, height, seed)
    x = margin
    client, supplier = rng.sample(_PARTIES, 2)
    number = f"SA-{rng.randint(1000, 9999)}-{rng.randint(10, 99)}"
    date = f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2019, 2026)}"
    facts = {"contract_number": number, "client": client, "supplier": supplier, "date": date}

    draw.text((x, y), "MASTER SERVICES AGREEMENT", font=font(int(64 * unit), bold=True), fill="black")
    y += int(100 * unit)
    draw.text((x, y), f"Agreement No. {number}    Effective Date: {date}", font=font(int(34 * unit)), fill="black")
    y += int(70 * unit)
    for role, name in (("Client", client), ("Supplier", supplier)):
        city = rng.choice(_CITIES)
        facts[f"{role.lower()}_city"] = city
        draw.text((x, y), f"{role}: {name}, {rng.randint(1, 250)} Harbour Street, {city}", font=font(int(30 * unit)),
                  fill="black")
        y += int(48 * unit)
    _clauses(rng, draw, facts, unit, margin, width, height, y + int(30 * unit))
    y = _fee_table(rng, draw, facts, unit, margin, width, int(height * 0.66))
    _small_print(rng, draw, facts, unit, margin, width, y)
    draw.text((margin, height - int(120 * unit)), "Signed for the Client: ____________________",
              font=font(int(26 * unit)), fill="black")
    draw.text((width // 2, height - int(120 * unit)), "Signed for the Supplier: ____________________",
              font=font(int(26 * unit)), fill="black")
    return Page(image=page, facts=facts)


def _clauses(rng, draw, facts: dict, unit: float, margin: int, width: int, height: int, y: int) -> None:
    """Eight numbered clauses in two columns, from ``y`` down to 62% of the page height."""
    column_width = (width - 3 * margin) // 2
    col_x, col_top = [margin, margin + column_width + margin], y
    col, body = 0, font(int(24 * unit))
    for i, (title, text) in enumerate(rng.sample(_CLAUSES, 8), start=1):
        values = {"n": rng.randint(6, 60), "amount": f"{rng.randint(10, 990)},{rng.randint(0, 999):03d}",
                  "days": rng.choice([14, 30, 45, 60, 90]), "city": rng.choice(_CITIES)}
        text = text.format(**values)
        facts[f"clause_{i}_title"] = title
        facts[f"clause_{i}_text"] = text
        block = [f"{i}. {title}"] + _wrap(draw, text, body, column_width)
        needed = int(36 * unit) * len(block) + int(24 * unit)
        if y + needed > height * 0.62 and col == 0:
            col, y = 1, col_top
        draw.text((col_x[col], y), block[0], font=font(int(26 * unit), bold=True), fill="black")
        y += int(38 * unit)
        for line in block[1:]:
            draw.text((col_x[col], y), line, font=body, fill="black")
            y += int(34 * unit)
        y += int(20 * unit)


def _fee_table(rng, draw, facts: dict, unit: float, margin: int, width: int, y: int) -> int:
    """A four-row fee table at ``y``; returns the y below it."""
    headers, rows = ["Item", "Units", "Unit price (EUR)", "Total (EUR)"], []
    for item in rng.sample(["Data processing", "Support hours", "Storage (TB)", "Licences", "Training days"], 4):
        units, price = rng.randint(1, 400), rng.randint(20, 2000)
        rows.append([item, str(units), f"{price:,}", f"{units * price:,}"])
        facts[f"table_{item}_total"] = f"{units * price:,}"
    cell_w, cell_h = (width - 2 * margin) // 4, int(48 * unit)
    for r, row in enumerate([headers] + rows):
        for c, value in enumerate(row):
            box = (margin + c * cell_w, y + r * cell_h, margin + (c + 1) * cell_w, y + (r + 1) * cell_h)
            draw.rectangle(box, outline="black", width=max(1, int(2 * unit)))
            draw.text((box[0] + int(12 * unit), box[1] + int(10 * unit)), value,
                      font=font(int(24 * unit), bold=r == 0, mono=r > 0), fill="black")
    return y + cell_h * (len(rows) + 1) + int(50 * unit)


def _small_print(rng, draw, facts: dict, unit: float, margin: int, width: int, y: int) -> None:
    small = font(max(8, int(15 * unit)))
    rate = f"{rng.randint(2, 9)}.{rng.randint(0, 9)}%"
    facts["interest_rate"] = rate
    fine_print = ("Small print: all amounts exclude VAT. Invoices unpaid after the due date accrue interest at "
                  f"{rate} per annum. " * 3)
    for line in _wrap(draw, fine_print, small, width - 2 * margin):
        draw.text((margin, y), line, font=small, fill=(60, 60, 60))
        y += int(22 * unit)


def _wrap(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=fnt) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


_ITEMS = ["Steel brackets", "Copper wire (m)", "Pallet wrap", "Sensor module", "Cable ties", "Hydraulic hose",
          "Safety gloves", "LED panel", "Bearing 6204", "Label rolls", "Torque wrench", "Filter cartridge"]
_NAMES = ["Ana Ruiz", "Tomasz Nowak", "Mei Tanaka", "Oluwaseun Adeyemi", "Lars Eriksen", "Priya Raman",
          "Jonas Weber", "Claire Dubois"]


def render_invoice(width: int = 2880, height: int = 2160, seed: int = 0) -> Page:
    """An invoice: header fields, a line-item table with exact totals, payment terms in small print."""
    rng, page, draw, unit, margin, y = _blank(width, height, seed)
    seller, buyer = rng.sample(_PARTIES, 2)
    number = f"INV-{rng.randint(100000, 999999)}"
    date = f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2019, 2026)}"
    facts = {"invoice_number": number, "invoice_date": date, "seller": seller, "buyer": buyer}
    draw.text((margin, y), "INVOICE", font=font(int(72 * unit), bold=True), fill="black")
    draw.text((width // 2, y), seller, font=font(int(36 * unit), bold=True), fill="black")
    y += int(120 * unit)
    for label, value in (("Invoice No.", number), ("Date", date), ("Bill to", buyer)):
        draw.text((margin, y), f"{label}: {value}", font=font(int(32 * unit)), fill="black")
        y += int(52 * unit)
    y += int(40 * unit)
    headers, rows, total = ["Item", "Qty", "Unit price (EUR)", "Amount (EUR)"], [], 0
    for item in rng.sample(_ITEMS, rng.randint(5, 9)):
        qty, price = rng.randint(1, 500), rng.randint(1, 900)
        rows.append([item, str(qty), f"{price:,}", f"{qty * price:,}"])
        facts[f"qty_{item}"] = str(qty)
        total += qty * price
    facts["total"] = f"{total:,}"
    cell_w, cell_h = (width - 2 * margin) // 4, int(50 * unit)
    for r, row in enumerate([headers] + rows + [["", "", "TOTAL", f"{total:,}"]]):
        for c, value in enumerate(row):
            box = (margin + c * cell_w, y + r * cell_h, margin + (c + 1) * cell_w, y + (r + 1) * cell_h)
            draw.rectangle(box, outline="black", width=max(1, int(2 * unit)))
            draw.text((box[0] + int(12 * unit), box[1] + int(10 * unit)), value,
                      font=font(int(26 * unit), bold=r == 0 or c == 2 and value == "TOTAL", mono=r > 0),
                      fill="black")
    y += cell_h * (len(rows) + 2) + int(60 * unit)
    days = rng.choice([10, 14, 30, 45, 60])
    facts["payment_days"] = str(days)
    small = font(max(8, int(16 * unit)))
    terms = f"Payment terms: net {days} days. Bank transfer only; quote {number} as the reference. " * 2
    for line in _wrap(draw, terms, small, width - 2 * margin):
        draw.text((margin, y), line, font=small, fill=(60, 60, 60))
        y += int(24 * unit)
    return Page(image=page, facts=facts)


def render_form(width: int = 2880, height: int = 2160, seed: int = 0) -> Page:
    """A filled application form: labelled boxes in two columns, a checkbox row and a signature line."""
    rng, page, draw, unit, margin, y = _blank(width, height, seed)
    draw.text((margin, y), "EQUIPMENT LOAN APPLICATION", font=font(int(60 * unit), bold=True), fill="black")
    y += int(130 * unit)
    values = {
        "applicant": rng.choice(_NAMES), "employee_id": f"E{rng.randint(10000, 99999)}",
        "department": rng.choice(["Finance", "Logistics", "Research", "Legal", "Operations"]),
        "phone": f"+{rng.randint(10, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        "item": rng.choice(_ITEMS), "loan_days": str(rng.randint(1, 90)), "city": rng.choice(_CITIES),
        "start_date": f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2019, 2026)}",
    }
    labels = list(values)
    col_w, box_h = (width - 3 * margin) // 2, int(110 * unit)
    for i, key in enumerate(labels):
        x = margin + (i % 2) * (col_w + margin)
        top = y + (i // 2) * (box_h + int(30 * unit))
        draw.rectangle((x, top, x + col_w, top + box_h), outline="black", width=max(1, int(2 * unit)))
        draw.text((x + int(14 * unit), top + int(8 * unit)), key.replace("_", " ").title(),
                  font=font(int(20 * unit)), fill=(80, 80, 80))
        draw.text((x + int(14 * unit), top + int(46 * unit)), values[key], font=font(int(34 * unit), mono=True),
                  fill=(10, 10, 120))
    y += (len(labels) + 1) // 2 * (box_h + int(30 * unit)) + int(40 * unit)
    chosen = rng.choice(["Standard", "Express", "Overnight"])
    values["delivery"] = chosen
    x = margin
    for option in ("Standard", "Express", "Overnight"):
        side = int(34 * unit)
        draw.rectangle((x, y, x + side, y + side), outline="black", width=max(1, int(3 * unit)))
        if option == chosen:
            draw.line((x, y, x + side, y + side), fill="black", width=max(1, int(4 * unit)))
            draw.line((x, y + side, x + side, y), fill="black", width=max(1, int(4 * unit)))
        draw.text((x + side + int(16 * unit), y), option, font=font(int(30 * unit)), fill="black")
        x += int(420 * unit)
    return Page(image=page, facts=values)


RENDERERS = {"contract": render_contract, "invoice": render_invoice, "form": render_form}

# Question templates per fact: the answer is the fact's exact text.
_QUESTIONS = {
    "contract_number": "What is the agreement number?", "client": "Who is the client?",
    "supplier": "Who is the supplier?", "date": "What is the effective date?",
    "client_city": "In which city is the client?", "supplier_city": "In which city is the supplier?",
    "interest_rate": "What interest rate does the small print state?",
    "invoice_number": "What is the invoice number?", "invoice_date": "What is the invoice date?",
    "seller": "Who issued the invoice?", "buyer": "Who is the invoice billed to?", "total": "What is the total?",
    "payment_days": "How many days are the payment terms?",
    "applicant": "Who is the applicant?", "employee_id": "What is the employee ID?",
    "department": "Which department is on the form?", "phone": "What phone number is given?",
    "item": "Which item is requested?", "loan_days": "For how many days is the loan?",
    "city": "Which city is on the form?", "start_date": "What is the start date?",
    "delivery": "Which delivery option is ticked?",
}


def question(key: str) -> str | None:
    """The question whose exact answer is the fact ``key``; None for facts without one."""
    if key in _QUESTIONS:
        return _QUESTIONS[key]
    if key.startswith("clause_") and key.endswith("_title"):
        return f"What is the title of clause {key.split('_')[1]}?"
    if key.startswith("table_") and key.endswith("_total"):
        return f"What is the total for {key[len('table_'):-len('_total')]} in the fee table?"
    if key.startswith("qty_"):
        return f"What quantity of {key[len('qty_'):]} is invoiced?"
    return None


def write_dataset(out: str | Path, *, num_pages: int, seed: int = 0, size: tuple[int, int] = (2880, 2160),
                  questions_per_page: int = 3, kinds: tuple[str, ...] = tuple(RENDERERS),
                  pdf_pages: int = 0, progress=None) -> Path:
    """Render ``num_pages`` pages (kinds in turn) and write ``out/data.json`` in the LLaVA conversation format,
    one record per question, answers exact. Deterministic given ``seed``. ``pdf_pages`` = 0: each page a PNG under
    ``out/images``; K > 0: every K pages one PDF under ``out/docs`` (scanned-style, the page images embedded), and
    each question shows the whole document ("Page N:" before each page) with its answer on one of the pages."""
    import json

    out = Path(out)
    width, height = size
    if width < 64 or height < 64:
        raise ValueError(f"page size {width}x{height} is too small to render text (at least 64x64)")
    unknown = [k for k in kinds if k not in RENDERERS]
    if unknown:
        raise ValueError(f"unknown page kinds {unknown}; available: {sorted(RENDERERS)}")
    if pdf_pages < 0:
        raise ValueError(f"pdf_pages must be >= 0, got {pdf_pages}")
    (out / ("docs" if pdf_pages else "images")).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict] = []
    pending: list[tuple[str, int, Page]] = []  # (kind, index, page) of the PDF being gathered
    for i in range(num_pages):
        kind = kinds[i % len(kinds)]
        page_seed = rng.randrange(2**31)
        page = RENDERERS[kind](width, height, seed=page_seed)
        if pdf_pages:
            pending.append((kind, page_seed, page))
            if len(pending) == pdf_pages or i == num_pages - 1:
                records += _pdf_records(out, len(records), pending, questions_per_page)
                pending = []
        else:
            name = f"images/{kind}-{i:05d}.png"
            page.image.save(out / name)
            for j, key in enumerate(_asked(page, page_seed, questions_per_page)):
                turns = [{"from": "human", "value": f"<image>\n{question(key)}"},
                         {"from": "gpt", "value": page.facts[key]}]
                records.append({"id": f"{kind}-{i:05d}-{j}", "image": name, "kind": kind, "field": key,
                                "conversations": turns})
        if progress:
            progress(i + 1, num_pages)
    (out / "data.json").write_text(json.dumps(records, indent=1))
    return out / "data.json"


def _asked(page: Page, page_seed: int, count: int) -> list[str]:
    keys = [k for k in page.facts if question(k)]
    return random.Random(page_seed).sample(keys, min(count, len(keys)))


def _pdf_records(out: Path, first_id: int, pages: list[tuple[str, int, Page]], per_page: int) -> list[dict]:
    """Write one PDF of ``pages`` and the records asking about it: every question sees every page."""
    name = f"docs/doc-{first_id:06d}.pdf"
    images = [page.image.copy() for _, _, page in pages]  # copies: Pillow's PDF writer must not reuse the objects
    images[0].save(out / name, save_all=True, append_images=images[1:], resolution=72.0)
    shown = "".join(f"Page {n}:\n<image>\n" for n in range(1, len(pages) + 1))
    records = []
    for number, (kind, page_seed, page) in enumerate(pages, start=1):
        for key in _asked(page, page_seed, per_page):
            records.append({"id": f"doc-{first_id:06d}-p{number}-{key}",
                            "image": [f"{name}#page={n}" for n in range(1, len(pages) + 1)], "kind": kind,
                            "field": key,
                            "conversations": [{"from": "human", "value": shown + question(key)},
                                              {"from": "gpt", "value": page.facts[key]}]})
    return records
