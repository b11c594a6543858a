"""The repository explains itself: no source cites a document it does not hold, and every
citation of docs/architecture.md names a section that exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def sources() -> list[Path]:
    return [p for d in ("rft_cluster", "benchmarks", "scripts", "tests") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".md")] + [ROOT / "README.md"]


def test_nothing_cites_a_design_document_outside_the_repository() -> None:
    cited = [f"{p.relative_to(ROOT)}:{i}" for p in sources() if p != Path(__file__)
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"DESIGN(\.md| §)", line)]
    assert cited == []


def test_architecture_citations_name_its_sections() -> None:
    sections = {m for m in re.findall(r"^## (\d+)\. ", ARCHITECTURE.read_text(), re.MULTILINE)}
    cited = {(p.relative_to(ROOT).as_posix(), n) for p in sources() for n in re.findall(r"docs/architecture\.md §(\d+)", p.read_text())}
    assert cited, "the modules point at the architecture document"
    assert {c for c in cited if c[1] not in sections} == set()


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path) -> list[str]:
    prose = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", prose) if "://" not in t]


def test_the_readme_is_a_front_door_to_every_docs_page() -> None:
    """One screenful that reaches every page, and no page or anchor a link names is missing."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 150
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _links(readme) if t.startswith("docs/")}
    assert {p.resolve() for p in (ROOT / "docs").glob("*.md")} <= linked
    broken = []
    for page in [readme, *(ROOT / "docs").glob("*.md")]:
        for target in _links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.name}: {target}")
    assert broken == []
