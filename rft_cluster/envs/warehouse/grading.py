"""Scoring of a stock answer: units are whole numbers, so the LAST integer in the reply must equal
the reference exactly (a reply may restate the product's name first). A digit glued to a letter or
a hyphen ("SKU-40213") is not the answer."""

from __future__ import annotations

import re

_INTEGER = re.compile(r"(?<![\w.-])\d+(?![\w.])")


def score(output_text: str, answer: float) -> tuple[float, float | None]:
    """(1.0 or 0.0, the integer read from the text or None)."""
    found = _INTEGER.findall(output_text)
    if not found:
        return 0.0, None
    given = float(found[-1])
    return (1.0 if given == answer else 0.0), given
