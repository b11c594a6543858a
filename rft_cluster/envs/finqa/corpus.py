"""The corpus: seeded quarterly reports of made-up companies, one short text file per quarter at
`<root>/<company-slug>/<year>/Q<n>.txt`.

Reports are plain data (`Report`) first and text second, so questions and their answers come
from the same numbers the files show. The same seed and sizes give the same reports, byte for
byte, so datasets written earlier match a tree written (or served) later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

N_COMPANIES = 70
YEARS = tuple(range(2015, 2025))
QUARTERS = (1, 2, 3, 4)

# (key, label as printed in the report and asked in questions). Money is in USD millions with one
# decimal; headcount is a whole number.
METRICS = (
    ("revenue", "Revenue"),
    ("operating_expenses", "Operating expenses"),
    ("net_income", "Net income"),
    ("cash", "Cash"),
    ("headcount", "Headcount"),
)
METRIC_LABELS = dict(METRICS)

_SYLLABLES = "al bor cen dra fen gal hex ion jun kor lum mar nov or pax quin ros sol tal ux vel wyn xan yor zel".split()
_SECTORS = (
    "Robotics", "Foods", "Energy", "Logistics", "Biotech", "Software", "Mining", "Textiles", "Aerospace",
    "Retail", "Media", "Pharma", "Shipping", "Semiconductors", "Insurance", "Telecom", "Motors", "Chemicals",
)


@dataclass(frozen=True)
class Report:
    company: str
    slug: str
    year: int
    quarter: int
    values: dict[str, float | int]  # metric key → value

    @property
    def path(self) -> str:
        """Path relative to the corpus root, with '/' separators (as the tools show it)."""
        return f"{self.slug}/{self.year}/Q{self.quarter}.txt"

    @property
    def title(self) -> str:
        """The report's first line: names it uniquely, and is what search indexes."""
        return f"{self.company} quarterly report, Q{self.quarter} {self.year}"

    def text(self) -> str:
        # Line items as questions name them ("- net income: 31.8"), so a reply can name one in the
        # question's words and find its line by them.
        lines = [self.title, "(USD millions, except headcount)"]
        lines += [f"- {label.lower()}: {self.values[key]}" for key, label in METRICS]
        return "\n".join(lines) + "\n"


def _company_names(rng: random.Random, n: int) -> list[str]:
    """n distinct names like "Korvel Robotics"; the invented first word keeps each one distinctive."""
    if n > len(_SYLLABLES) ** 2:
        raise ValueError(f"at most {len(_SYLLABLES) ** 2} companies (distinct two-syllable names)")
    names: dict[str, str] = {}  # first word → name, so no two companies share a first word
    while len(names) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        names.setdefault(word, f"{word} {rng.choice(_SECTORS)}")
    return list(names.values())


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _millions(value: float) -> float:
    return round(value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.0" in a report


def _company_reports(rng: random.Random, company: str, years: tuple[int, ...]) -> list[Report]:
    """Every quarter of `years` for one company: revenue grows with noise, costs track revenue (so net
    income is sometimes negative), cash follows the profits, headcount follows revenue."""
    revenue = rng.uniform(20, 900)
    growth = rng.uniform(-0.01, 0.04)
    cost_ratio = rng.uniform(0.7, 0.98)
    cash = revenue * rng.uniform(0.5, 3)
    staff_per_million = rng.uniform(3, 12)
    reports = []
    for year in years:
        for quarter in QUARTERS:
            revenue *= 1 + growth + rng.gauss(0, 0.04)
            opex = revenue * (cost_ratio + rng.gauss(0, 0.05))
            net_income = (revenue - opex) * 0.79
            cash = max(1.0, cash + net_income + rng.gauss(0, revenue * 0.05))
            values: dict[str, float | int] = {
                "revenue": _millions(revenue),
                "operating_expenses": _millions(opex),
                "net_income": _millions(net_income),
                "cash": _millions(cash),
                "headcount": round(revenue * staff_per_million * rng.uniform(0.95, 1.05)),
            }
            reports.append(Report(company, _slug(company), year, quarter, values))
    return reports


def generate_reports(seed: int, n_companies: int = N_COMPANIES, years: tuple[int, ...] = YEARS) -> list[Report]:
    """Every report, company by company, in chronological order. Deterministic per arguments."""
    rng = random.Random(f"finqa-corpus-{seed}")
    reports: list[Report] = []
    for company in _company_names(rng, n_companies):
        reports += _company_reports(rng, company, years)
    return reports


def write_corpus(root: str | Path, reports: list[Report]) -> Path:
    """Writes each report to `<root>/<report.path>`; returns the root."""
    root = Path(root)
    for directory in sorted({root / r.slug / str(r.year) for r in reports}):
        directory.mkdir(parents=True, exist_ok=True)
    for report in reports:
        (root / report.path).write_text(report.text())
    return root
