"""What documents carry and what is asked about them, as declarative tables: the nine kinds, their fields (label
wordings, question wordings, value generators), clauses, yes/no boxes, and the split of wordings between training
and held-out pages (the last wording of each is kept out of training). ``fovea.data.documents`` draws them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

REFUSAL = "Not on the page."  # the reference answer when the page does not hold what was asked
SPLITS = ("train", "heldout")
QUESTION_KINDS = ("field", "table", "clause", "yes/no", "absent")
_MONTHS = "January February March April May June July August September October November December".split()
_COMPANIES = ("Aldermoor Logistics Ltd.", "Brightwater Analytics GmbH", "Cobalt Ridge Holdings", "Dunmore & Pike LLP",
              "Eastgate Medical Supply", "Fernhill Robotics Inc.", "Granite Bay Capital", "Harbourline Shipping Co.",
              "Ivers & Quist AG", "Juniper Fields B.V.", "Kestrel Foods plc", "Lindqvist Tooling AB",
              "Marlow Print Works", "Northwind Traders S.A.", "Okafor Energy Ltd.", "Petrov Metals Co.")
_PEOPLE = ("Anna Lindqvist", "Ben Okafor", "Carla Rossi", "David Nakamura", "Elena Petrov", "Farid Haddad",
           "Grace Whitfield", "Hugo Moreau", "Ines Valdez", "Jonas Svensson", "Keiko Tanaka", "Liam Young",
           "Maria Kowalski", "Nils Jansen", "Olivia Zeller", "Paul Dunmore")
_CITIES = ("Rotterdam", "Lyon", "Toronto", "Osaka", "Melbourne", "Denver", "Lisbon", "Gdansk", "Bergen", "Porto",
           "Austin", "Leeds", "Graz", "Malmo", "Turin", "Halifax")
_STREETS = ("Harbour Road", "Mill Lane", "Station Street", "King's Avenue", "Elm Close", "Quay Street", "Park Row")
ITEMS = ("Steel brackets", "Copy paper A4", "Safety gloves", "Label printer", "Cable ties", "LED panels",
         "Desk chairs", "Toner cartridge", "Pallet wrap", "Hard hats", "USB-C hubs", "Filing cabinets",
         "Hand sanitiser", "Shelving units", "Drill bits", "Work lamps")
CURRENCIES = ("$", "EUR ", "£", "USD ", "€")


# ----- values -----------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """One page's random choices that several values share (currency, date style)."""

    rng: random.Random  # the page's generator
    currency: str  # printed before amounts
    date_style: int  # index into ``date_value`` formats


def date_value(c: Ctx) -> str:
    d, m, y = c.rng.randint(1, 28), c.rng.randint(1, 12), c.rng.randint(2019, 2027)
    return (f"{d:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{d:02d}", f"{_MONTHS[m - 1]} {d}, {y}",
            f"{d} {_MONTHS[m - 1][:3]} {y}", f"{m:02d}/{d:02d}/{y}")[c.date_style]


def _money(c: Ctx, low: int = 10, high: int = 90_000) -> str:
    return f"{c.currency}{c.rng.randint(low, high):,}.{c.rng.randint(0, 99):02d}"


def _ident(prefix: str) -> Callable[[Ctx], str]:
    return lambda c: f"{prefix}{c.rng.randint(10_000, 999_999)}"


def _choice(pool: tuple[str, ...]) -> Callable[[Ctx], str]:
    return lambda c: c.rng.choice(pool)


def _phone(c: Ctx) -> str:
    return f"+{c.rng.randint(10, 99)} {c.rng.randint(100, 999)} {c.rng.randint(1000, 9999)}"


def _address(c: Ctx) -> str:
    return f"{c.rng.randint(1, 240)} {c.rng.choice(_STREETS)}, {c.rng.choice(_CITIES)}"


def _email(c: Ctx) -> str:
    first, last = c.rng.choice(_PEOPLE).lower().split()
    return f"{first}.{last}@{c.rng.choice(('mail.example', 'corp.example', 'office.example'))}"


# ----- what a page can carry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSpec:
    key: str  # the fact's name, unique across kinds for one concept
    labels: tuple[str, ...]  # printed label wordings; the last is held out
    questions: tuple[str, ...]  # question wordings; the last is held out
    value: Callable[[Ctx], str]  # draws the exact printed value


def F(key: str, labels: str, questions: str, value: Callable[[Ctx], str]) -> FieldSpec:  # noqa: N802
    """A field from "|"-separated wordings (the declarative tables below stay one line each)."""
    return FieldSpec(key, tuple(labels.split("|")), tuple(questions.split("|")), value)


FIELDS = {f.key: f for f in (
    F("invoice_number", "Invoice No.|Invoice Number|Invoice #|Inv. No.", "What is the invoice number?|Which invoice "
      "number is shown?|Give the invoice number.|What number does this invoice have?", _ident("INV-")),
    F("invoice_date", "Invoice Date|Date|Date of issue|Issued", "What is the invoice date?|When was the invoice "
      "issued?|On what date was this invoice issued?", date_value),
    F("due_date", "Due Date|Payment due|Due by|Pay before", "When is payment due?|What is the due date?|By which "
      "date must it be paid?", date_value),
    F("seller", "From|Seller|Issued by|Vendor", "Who issued the invoice?|Which company sent this invoice?|Who is the "
      "seller?", _choice(_COMPANIES)),
    F("buyer", "Bill to|Customer|Billed to|Invoice to", "Who is the invoice billed to?|Who is the customer?|Which "
      "company is billed?", _choice(_COMPANIES)),
    F("vat_number", "VAT No.|VAT ID|Tax ID|VAT Reg.", "What is the VAT number?|Which tax ID is given?|What VAT "
      "registration number appears?", _ident("VAT")),
    F("po_number", "PO Number|Order No.|Purchase Order #|P.O.", "What is the purchase order number?|Which order "
      "number is this?|What is the PO number?", _ident("PO-")),
    F("order_date", "Order Date|Date|Ordered on|Date of order", "When was the order placed?|What is the order "
      "date?|On which date was it ordered?", date_value),
    F("delivery_date", "Delivery Date|Deliver by|Required by|Delivery", "When must the goods be delivered?|What is "
      "the delivery date?|By when is delivery required?", date_value),
    F("supplier", "Supplier|Vendor|To|Order placed with", "Who is the supplier?|Which company supplies the "
      "order?|Who is the order placed with?", _choice(_COMPANIES)),
    F("ship_to", "Ship to|Deliver to|Delivery address|Consignee", "Where should the goods be shipped?|What is the "
      "delivery address?|To which address is it shipped?", _address),
    F("agreement_number", "Agreement No.|Contract No.|Reference|Contract ID", "What is the agreement number?|Which "
      "contract number is given?|What is the contract reference?", _ident("SA-")),
    F("effective_date", "Effective Date|Commencement|Start Date|Effective from", "What is the effective date?|When "
      "does the agreement take effect?|From which date is it effective?", date_value),
    F("client", "Client|Customer|Principal|Client party", "Who is the client?|Which company is the client?|Who is "
      "the customer under the agreement?", _choice(_COMPANIES)),
    F("provider", "Service Provider|Contractor|Consultant|Provider", "Who is the service provider?|Which company "
      "provides the services?|Who is the contractor?", _choice(_COMPANIES)),
    F("landlord", "Landlord|Lessor|Owner|Landlord name", "Who is the landlord?|What is the landlord's name?|Who is "
      "the lessor?", _choice(_PEOPLE)),
    F("tenant", "Tenant|Lessee|Resident|Tenant name", "Who is the tenant?|What is the tenant's name?|Who is the "
      "lessee?", _choice(_PEOPLE)),
    F("property", "Property|Premises|Address of premises|Rental unit", "What is the address of the property?|Which "
      "premises are leased?|Where is the rented property?", _address),
    F("monthly_rent", "Monthly Rent|Rent per month|Rent|Monthly payment", "What is the monthly rent?|How much is the "
      "rent per month?|What rent is due each month?", lambda c: _money(c, 400, 6_000)),
    F("deposit", "Security Deposit|Deposit|Bond|Damage deposit", "How much is the security deposit?|What deposit is "
      "required?|What is the deposit amount?", lambda c: _money(c, 400, 12_000)),
    F("applicant", "Applicant|Full name|Name|Applicant name", "Who is the applicant?|What is the applicant's "
      "name?|Who filled in the form?", _choice(_PEOPLE)),
    F("employee_id", "Employee ID|Staff No.|Personnel No.|Employee number", "What is the employee ID?|Which staff "
      "number is given?|What is the applicant's employee number?", _ident("E")),
    F("department", "Department|Team|Division|Unit", "Which department is on the form?|What department does the "
      "applicant work in?|Which division is named?", _choice(("Finance", "Logistics", "Research", "Legal",
                                                               "Operations", "Facilities", "Procurement"))),
    F("phone", "Phone|Telephone|Tel.|Contact number", "What phone number is given?|What is the telephone "
      "number?|Which number can be called?", _phone),
    F("email", "E-mail|Email|Email address|Contact e-mail", "What email address is given?|What is the e-mail "
      "address?|Which address can be emailed?", _email),
    F("start_date", "Start Date|From|First day|Starting", "What is the start date?|When does it start?|From which "
      "date does it run?", date_value),
    F("sender", "From|Sender|Written by|Signed", "Who wrote the letter?|Who is the sender?|Who signed the letter?",
      _choice(_PEOPLE)),
    F("recipient", "To|Addressee|Attn.|For the attention of", "Who is the letter addressed to?|Who is the "
      "recipient?|To whom is the letter written?", _choice(_PEOPLE)),
    F("letter_date", "Date|Dated|Written on|Date of letter", "What is the date of the letter?|When was the letter "
      "written?|On what date is the letter dated?", date_value),
    F("reference", "Our ref.|Reference|Ref.|File reference", "What is the reference of the letter?|Which reference "
      "number does the letter quote?|What file reference is given?", _ident("REF-")),
    F("store", "Store|Shop|Merchant|Sold by", "Which store issued the receipt?|What is the name of the shop?|Who is "
      "the merchant?", _choice(_COMPANIES)),
    F("receipt_number", "Receipt No.|Receipt #|Transaction|Receipt number", "What is the receipt number?|Which "
      "transaction number is printed?|What number does the receipt have?", _ident("R")),
    F("receipt_date", "Date|Sale date|Purchased|Date of sale", "When was the purchase made?|What is the date on the "
      "receipt?|On which date was it bought?", date_value),
    F("account_holder", "Account holder|Name|Customer|Account name", "Who is the account holder?|Whose account is "
      "this?|In whose name is the account?", _choice(_PEOPLE)),
    F("account_number", "Account No.|Account number|IBAN|Account", "What is the account number?|Which account "
      "number is shown?|What is the account's number?", lambda c: f"{c.rng.randint(10, 99)}-"
      f"{c.rng.randint(1000, 9999)}-{c.rng.randint(100000, 999999)}"),
    F("opening_balance", "Opening balance|Balance brought forward|Previous balance|Start balance", "What is the "
      "opening balance?|What balance was brought forward?|What was the balance at the start?",
      lambda c: _money(c, 100, 50_000)),
    F("closing_balance", "Closing balance|Balance carried forward|New balance|End balance", "What is the closing "
      "balance?|What balance is carried forward?|What was the balance at the end?", lambda c: _money(c, 100, 50_000)),
    F("statement_period", "Statement period|Period|For the period|Covering", "What period does the statement "
      "cover?|Which period is the statement for?|What is the statement period?",
      lambda c: f"{_MONTHS[c.rng.randrange(12)]} {c.rng.randint(2019, 2027)}"),
    F("prepared_by", "Prepared by|Compiled by|Author|Owner", "Who prepared the table?|Who compiled this "
      "document?|Who is named as its author?", _choice(_PEOPLE)),
    F("table_date", "Date|As of|Valid from|Updated", "What date is the table valid from?|As of which date is the "
      "table?|When was the table updated?", date_value),
)}


@dataclass(frozen=True)
class Clause:
    key: str  # the fact's name
    headings: tuple[str, ...]  # printed clause headings
    text: str  # the sentence; "{v}" is where the answer is printed
    questions: tuple[str, ...]  # question wordings; the last is held out
    value: Callable[[Ctx], str]  # the exact printed answer


def C(key: str, headings: str, text: str, questions: str, value: Callable[[Ctx], str]) -> Clause:  # noqa: N802
    return Clause(key, tuple(headings.split("|")), text, tuple(questions.split("|")), value)


def _days(*choices: int) -> Callable[[Ctx], str]:
    return lambda c: f"{c.rng.choice(choices)} days"


CLAUSES = {c.key: c for c in (
    C("termination_notice", "Termination|Ending the agreement|Notice of termination", "Either party may terminate "
      "this Agreement by giving {v} written notice to the other party.", "How many days' notice does termination "
      "need?|What notice period applies to termination?|How much notice is needed to terminate?",
      _days(14, 30, 45, 60, 90)),
    C("term_months", "Term|Duration|Period of agreement", "This Agreement starts on the Effective Date and runs for "
      "{v} unless terminated earlier.", "How long does the agreement run?|What is the term of the agreement?|For "
      "how long is the agreement in force?", lambda c: f"{c.rng.choice((6, 12, 18, 24, 36, 48))} months"),
    C("liability_cap", "Liability|Limitation of liability|Liability cap", "The total liability of either party shall "
      "not exceed {v} in any contract year.", "What is the liability cap?|Up to what amount is liability "
      "limited?|What is the maximum liability per year?", lambda c: _money(c, 10_000, 900_000)),
    C("governing_law", "Governing law|Applicable law|Jurisdiction", "This Agreement is governed by the laws "
      "applicable in {v}.", "Which city's law governs the agreement?|Where is the governing law?|Under the law of "
      "which place is the agreement governed?", _choice(_CITIES)),
    C("payment_terms", "Payment terms|Payment|Terms of payment", "Invoices are payable within {v} of the invoice "
      "date by bank transfer.", "Within how many days must invoices be paid?|What are the payment terms?|How long "
      "is there to pay an invoice?", _days(10, 14, 21, 30, 45, 60)),
    C("late_fee", "Late payment|Late fees|Overdue rent", "Rent paid late carries a fee of {v} of the monthly rent.",
      "What is the late fee?|How much is charged for late rent?|What percentage is charged on late payment?",
      lambda c: f"{c.rng.choice((2, 3, 4, 5, 8, 10))}%"),
    C("lease_term", "Lease term|Term of tenancy|Duration", "The tenancy runs for {v} from the start date.", "How long "
      "is the lease?|What is the lease term?|For how long is the property let?",
      lambda c: f"{c.rng.choice((6, 12, 24, 36))} months"),
    C("delivery_terms", "Delivery|Shipping terms|Delivery terms", "Goods must be delivered within {v} of this "
      "order.", "Within how many days must the goods be delivered?|What delivery time is required?|How soon must "
      "the order be delivered?", _days(3, 5, 7, 10, 14, 21)),
    C("confidentiality_years", "Confidentiality|Secrecy|Non-disclosure", "Each party shall keep the other's "
      "information confidential for {v} after the Agreement ends.", "For how long does confidentiality "
      "last?|How many years does the confidentiality duty run?|How long must information be kept secret?",
      lambda c: f"{c.rng.choice((1, 2, 3, 5, 7, 10))} years"),
)}


@dataclass(frozen=True)
class Check:
    key: str  # the fact's name
    labels: tuple[str, ...]  # printed wordings of the statement ticked Yes or No
    questions: tuple[str, ...]  # yes/no question wordings; the last is held out


def K(key: str, labels: str, questions: str) -> Check:  # noqa: N802
    return Check(key, tuple(labels.split("|")), tuple(questions.split("|")))


CHECKS = {c.key: c for c in (
    K("paid", "Paid|Payment received|Settled", "Is the invoice marked as paid?|Has this invoice been paid?|Does the "
      "invoice show payment received?"),
    K("partial_delivery", "Partial delivery allowed|Split shipments accepted|Part deliveries OK", "Are partial "
      "deliveries allowed?|May the order be delivered in parts?|Is split shipment accepted?"),
    K("auto_renewal", "Renews automatically|Automatic renewal|Auto-renew", "Does the agreement renew "
      "automatically?|Is there automatic renewal?|Will the contract auto-renew?"),
    K("pets", "Pets allowed|Pets permitted|Animals allowed", "Are pets allowed?|May the tenant keep pets?|Does the "
      "lease permit animals?"),
    K("furnished", "Furnished|Furniture included|Comes furnished", "Is the property furnished?|Does the rent include "
      "furniture?|Is it let furnished?"),
    K("urgent", "Urgent|Priority request|Express handling", "Is the request marked urgent?|Is this a priority "
      "request?|Was express handling requested?"),
    K("card_payment", "Paid by card|Card payment|Card", "Was it paid by card?|Did the customer pay by card?|Was a "
      "card used to pay?"),
    K("overdraft", "Overdraft used|Account overdrawn|Overdraft", "Was the overdraft used?|Did the account go "
      "overdrawn?|Is the overdraft marked as used?"),
)}


@dataclass(frozen=True)
class Kind:
    titles: tuple[str, ...]  # printed titles; the last is held out
    fields: tuple[str, ...]  # field keys: the first ``required`` always, the rest sometimes
    required: int  # how many of ``fields`` every page carries
    table: str | None = None  # "items" (qty x price), "transactions", "rates" or None
    clauses: tuple[str, ...] = ()  # clause keys, a random subset drawn
    checks: tuple[str, ...] = ()  # yes/no keys, a random subset drawn
    letter: bool = False  # body paragraphs in letter form around the fields


KINDS = {
    "invoice": Kind(("INVOICE", "Tax Invoice", "Invoice", "Commercial Invoice"),
                    ("invoice_number", "invoice_date", "seller", "buyer", "due_date", "vat_number", "po_number"), 4,
                    table="items", clauses=("payment_terms",), checks=("paid",)),
    "purchase_order": Kind(("PURCHASE ORDER", "Purchase Order", "Order Form", "P.O."),
                           ("po_number", "order_date", "supplier", "ship_to", "delivery_date", "phone"), 3,
                           table="items", clauses=("delivery_terms", "payment_terms"), checks=("partial_delivery",)),
    "contract": Kind(("SERVICES AGREEMENT", "Master Services Agreement", "Consulting Contract", "Service Contract"),
                     ("agreement_number", "effective_date", "client", "provider"), 3,
                     clauses=("term_months", "termination_notice", "liability_cap", "governing_law",
                              "confidentiality_years", "payment_terms"), checks=("auto_renewal",)),
    "lease": Kind(("RESIDENTIAL LEASE", "Lease Agreement", "Tenancy Agreement", "Rental Agreement"),
                  ("landlord", "tenant", "property", "monthly_rent", "deposit", "start_date"), 4,
                  clauses=("lease_term", "late_fee", "termination_notice"), checks=("pets", "furnished")),
    "form": Kind(("EQUIPMENT LOAN APPLICATION", "Leave Request Form", "Registration Form", "Access Request"),
                 ("applicant", "employee_id", "department", "phone", "email", "start_date"), 3, checks=("urgent",)),
    "letter": Kind(("", "", "", ""), ("sender", "recipient", "letter_date", "reference"), 3, letter=True,
                   clauses=("payment_terms", "termination_notice")),
    "receipt": Kind(("RECEIPT", "Sales Receipt", "Till Receipt", "Cash Receipt"),
                    ("store", "receipt_number", "receipt_date"), 2, table="items", checks=("card_payment",)),
    "statement": Kind(("ACCOUNT STATEMENT", "Bank Statement", "Statement of Account", "Monthly Statement"),
                      ("account_holder", "account_number", "statement_period", "opening_balance", "closing_balance"),
                      3, table="transactions", checks=("overdraft",)),
    "table": Kind(("PRICE LIST", "Rate Card", "Schedule of Rates", "Tariff"), ("prepared_by", "table_date"), 0,
                  table="rates"),
}
# Concepts only one kind has: asked on other kinds' pages, their honest answer is the refusal.
UNIQUE = ("landlord", "tenant", "monthly_rent", "account_number", "closing_balance", "employee_id", "vat_number",
           "ship_to", "receipt_number", "agreement_number")


def variants(options: tuple, split: str) -> tuple:
    """The wordings a split may use: training all but the last, held out the last (one wording: both)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(options) < 2:
        return options
    return options[:-1] if split == "train" else options[-1:]


@dataclass
class Fact:
    key: str  # field, clause, check or table-cell name
    answer: str  # the exact text on the page (or ``REFUSAL``)
    question: str  # one wording, drawn for this page
    kind: str  # one of ``QUESTION_KINDS``
    evidence: str = ""  # the page's text that answers it, as a reader would transcribe it ("" for absent ones)
