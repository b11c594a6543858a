"""What every grader implementation shares: its name in errors; template failures and
unexpected exceptions turned into grader failures (score None), never into exceptions; and the
check of every result before anyone uses it — the score finite and within the grader's
`score_range`, its error text (`fail`) under the surrogate rule of `rft_cluster.untrusted`."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

from rft_cluster.graders.template import TemplateError
from rft_cluster.http import clip
from rft_cluster.types import GradeResult
from rft_cluster.untrusted import replace_surrogates

__all__ = ["BaseGrader", "clip", "finite_number"]

log = logging.getLogger(__name__)


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is a finite real number, else None (`true` is not a score)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return number if math.isfinite(number) else None


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
        if score is None or not low <= score <= high:
            failed = self.fail(f"score {result.score!r} is outside score_range [{low:g}, {high:g}]")
            failed.details = result.details
            return failed
        return result

    @abstractmethod
    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult: ...

    def fail(self, why: str) -> GradeResult:
        return GradeResult(score=None, error=replace_surrogates(f"grader {self.name!r}: {why}"))

    async def close(self) -> None:
        """Releases what the grader holds (HTTP sessions); most hold nothing."""
