"""What the benchmark scripts share: where results go and how they are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(results: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Prints the result and writes it to `results/name` as JSON; returns the file."""
    out = Path(results) / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"[bench] written to {out}")
    return out
