"""Every figure the README and docs/ quote comes from a committed, stamped result file.

A figure is written `0.038 [↗](../benchmarks/results/weight-sync.json "parts.publish.ratio")`: the
link names the result file and, as its title, the key path of the value (docs/throughput.md).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# A number, then a link into benchmarks/results/ whose title is the value's key path.
CITATION = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*\[[^\]]*\]\(((?:\.\./)?benchmarks/results/[\w.-]+\.json) \"([^\"]+)\"\)")
STAMP = ("commit", "command", "machine", "versions")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def lookup(data: Any, key_path: str) -> Any:
    """`a.b.0.c`: keys of mappings and indices of lists, in order."""
    for part in key_path.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def stamp_problems(result: dict[str, Any]) -> list[str]:
    """What a result file lacks to say what it was measured on (empty when it is stamped)."""
    problems = [f"no {key}" for key in STAMP if not result.get(key)]
    commit = str(result.get("commit", ""))
    if commit and not re.fullmatch(r"[0-9a-f]{40}", commit):
        problems.append(f"commit {commit!r} is not one clean commit")
    return problems


def citation_problems(page: Path) -> list[str]:
    """Each figure on `page` that its result file does not hold, to the digits shown."""
    problems = []
    prose = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)  # an example in code is no figure
    for number, target, key_path in CITATION.findall(prose):
        path = (page.parent / target).resolve()
        if not path.is_file():
            problems.append(f"{page.name}: {number} cites {target}, which does not exist")
            continue
        try:
            value = lookup(json.loads(path.read_text()), key_path)
        except (KeyError, IndexError, ValueError, TypeError):
            problems.append(f"{page.name}: {number} cites {target} {key_path!r}, which it does not hold")
            continue
        shown = Decimal(number.replace(",", ""))
        if not isinstance(value, (int, float)) or Decimal(str(value)).quantize(shown) != shown:
            problems.append(f"{page.name}: {number} cites {target} {key_path!r}, which holds {value!r}")
    return problems


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_quoted_figure_is_what_its_result_file_holds(page: Path) -> None:
    assert citation_problems(page) == []


def test_every_committed_result_names_its_commit_command_machine_and_versions() -> None:
    unstamped = {p.name: stamp_problems(json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))}
    assert {name: problems for name, problems in unstamped.items() if problems} == {}


def test_the_checks_catch_a_wrong_figure_and_an_unstamped_result(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    stamped = {"commit": "a" * 40, "command": "python bench.py", "machine": {"cpus": 2}, "versions": {"ray": "2.60.0"},
               "parts": {"publish": {"ratio": 0.0381}}, "runs": [{"reward": 0.6}]}
    (results / "r.json").write_text(json.dumps(stamped))
    page = tmp_path / "docs" / "p.md"
    page.parent.mkdir()
    page.write_text('A publish at 0.038 [↗](../benchmarks/results/r.json "parts.publish.ratio") of memcpy, '
                    'reward 0.60 [↗](../benchmarks/results/r.json "runs.0.reward").')
    assert citation_problems(page) == []
    page.write_text('0.040 [↗](../benchmarks/results/r.json "parts.publish.ratio"), 7 [↗](../benchmarks/results/r.json "parts.x"), '
                    '1 [↗](../benchmarks/results/gone.json "a")')
    assert [p.split(": ", 1)[1] for p in citation_problems(page)] == [
        "0.040 cites ../benchmarks/results/r.json 'parts.publish.ratio', which holds 0.0381",
        "7 cites ../benchmarks/results/r.json 'parts.x', which it does not hold",
        "1 cites ../benchmarks/results/gone.json, which does not exist",
    ]
    assert stamp_problems(stamped) == []
    assert stamp_problems({**stamped, "commit": "a" * 40 + "-dirty", "command": ""}) == [
        "no command", f"commit {'a' * 40 + '-dirty'!r} is not one clean commit"]
