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


@dataclass
class Page:
    image: Image.Image  # the rendered page, RGB
    facts: dict[str, str] = field(default_factory=dict)  # ground truth: field name -> exact text on the page


def render_contract(width: int = 2880, height: int = 2160, seed: int = 0) -> Page:
    """A services contract: title, parties, numbered clauses, a fee table and small print, scaled to the page."""
    rng = random.Random(seed)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    unit = height / 2160  # layout is designed for 2160 px high pages and scaled
    margin = int(140 * unit)
    x, y = margin, int(110 * unit)
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
    y += int(30 * unit)
    column_width = (width - 3 * margin) // 2
    col_x, col_top = [x, x + column_width + margin], y
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

    y = int(height * 0.66)
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
    y += cell_h * (len(rows) + 1) + int(50 * unit)
    small = font(max(8, int(15 * unit)))
    fine_print = ("Small print: all amounts exclude VAT. Invoices unpaid after the due date accrue interest at "
                  f"{rng.randint(2, 9)}.{rng.randint(0, 9)}% per annum. " * 3)
    for line in _wrap(draw, fine_print, small, width - 2 * margin):
        draw.text((margin, y), line, font=small, fill=(60, 60, 60))
        y += int(22 * unit)
    draw.text((margin, height - int(120 * unit)), "Signed for the Client: ____________________",
              font=font(int(26 * unit)), fill="black")
    draw.text((width // 2, height - int(120 * unit)), "Signed for the Supplier: ____________________",
              font=font(int(26 * unit)), fill="black")
    return Page(image=page, facts=facts)


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
