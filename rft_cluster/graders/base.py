"""What every grader implementation shares: its name in errors; template failures and
unexpected exceptions turned into grader failures (score None), never into exceptions; and the
check of every result before anyone uses it — the score finite and within the grader's
`score_range` (float rounding at its ends clamped, see `in_range`), its error text (`fail`) under the
surrogate rule of `rft_cluster.untrusted`."""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

from rft_cluster.config import in_score_range
from rft_cluster.graders.template import TemplateError
from rft_cluster.http import clip
from rft_cluster.types import GradeResult
from rft_cluster.untrusted import replace_surrogates

__all__ = ["BaseGrader", "clip", "finite_number"]

log = logging.getLogger(__name__)


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is a finite real number (numpy's scalars included), else None
    (`true` is not a score; numpy's bool_ is not a `numbers.Real`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):  # an int beyond float's range; a Real that refuses
        return None
    return number if math.isfinite(number) else None


def in_range(score: float, score_range: tuple[float, float]) -> float | None:
    """`score` clamped into `score_range` when it lies within float rounding of it
    (`config.in_score_range`: 0.4 + 0.2 + 0.3 + 0.1 is 1.0000000000000002), else None."""
    if not in_score_range(score, score_range):
        return None
    low, high = score_range
    return min(high, max(low, score))


class BaseGrader(ABC):
    # The scores this grader may give; `build_grader` sets the spec's `score_range`.
    score_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, name: str):
        self.name = name

    async def grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        try:
            result = await self._grade(sample, item, trace_id)
        except TemplateError as e:
            return self.fail(str(e))
        except Exception as e:  # a bug or a library's surprise must fail this grade, not the run
            log.exception("grader %r raised", self.name)
            return self.fail(f"internal error: {type(e).__name__}: {e}")
        return self._checked(result)

    def _checked(self, result: GradeResult) -> GradeResult:
        """`result` if its score may be trained on; else a failure saying why (a 1e308 would
        overflow the advantages, a NaN poison them)."""
        if result.score is None:
            return result
        low, high = self.score_range
        score = finite_number(result.score)
        clamped = None if score is None else in_range(score, self.score_range)
        if clamped is None:
            failed = self.fail(f"score {result.score!r} is outside score_range [{low:g}, {high:g}]")
            failed.details = result.details
            return failed
        result.score = clamped
        return result

    @abstractmethod
    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult: ...

    def fail(self, why: str) -> GradeResult:
        return GradeResult(score=None, error=replace_surrogates(f"grader {self.name!r}: {why}"))

    async def close(self) -> None:
        """Releases what the grader holds (HTTP sessions); most hold nothing."""
