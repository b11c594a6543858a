"""Partial-credit scoring of a numeric answer.

The answer is the LAST number in the output text, so a reply may restate the question's
"Q3 2019" before giving its figure. A number may carry a sign, a `$`, thousands commas and
decimals: "-$1,204.5M", "$-1204.5", "1204.50 million" all read as -1204.5 or 1204.5. Units
after the number (M, million) are ignored: questions fix the unit. A digit glued to a letter
("Q3", "FY2019") is not a number.

Scores: 1.0 for the exact number; 0.5 for the number rounded to fewer decimals (88.9 → 89) or
within 0.1 % of it; else 0.0.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

# sign (before or after "$"), integer part (plain or comma-grouped), optional fraction
_NUMBER = re.compile(r"(?<![\w.])(-?)\$?(-?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?")
EXACT, CLOSE, WRONG = 1.0, 0.5, 0.0
RELATIVE_TOLERANCE = 0.001


def last_number(text: str) -> tuple[float, int] | None:
    """(value, decimal places written) of the last number in text, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, sign_after_dollar, whole, fraction = matches[-1]
    value = float(f"{whole.replace(',', '')}.{fraction or 0}")
    return (-value if sign or sign_after_dollar else value), len(fraction)


def score(output_text: str, answer: float) -> tuple[float, float | None]:
    """(score, the number read from the text or None)."""
    parsed = last_number(output_text)
    if parsed is None:
        return WRONG, None
    given, places = parsed
    if math.isclose(given, answer, rel_tol=1e-12, abs_tol=1e-12):
        return EXACT, given
    rounded = places < _places(answer) and abs(given - answer) <= 0.5 * 10**-places + 1e-9
    close = abs(given - answer) <= RELATIVE_TOLERANCE * abs(answer)
    return (CLOSE if rounded or close else WRONG), given


def _places(number: float) -> int:
    """Decimal places of a reference answer as written (88.9 → 1, 394.0 → 0, 1685 → 0)."""
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return max(0, -int(exponent))
