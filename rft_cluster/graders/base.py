"""What every grader implementation shares: its name in errors, and template failures and
unexpected exceptions turned into grader failures (score None), never into exceptions."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

from rft_cluster.graders.template import TemplateError
from rft_cluster.types import GradeResult

log = logging.getLogger(__name__)

# How much of a failing grader's response (or a judge's reply) to keep in the error message.
ERROR_TEXT_CHARS = 500


def clip(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


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
    def __init__(self, name: str):
        self.name = name

    async def grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        try:
            return await self._grade(sample, item, trace_id)
        except TemplateError as e:
            return self.fail(str(e))
        except Exception as e:  # a bug or a library's surprise must fail this grade, not the run
            log.exception("grader %r raised", self.name)
            return self.fail(f"internal error: {type(e).__name__}: {e}")

    @abstractmethod
    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult: ...

    def fail(self, why: str) -> GradeResult:
        return GradeResult(score=None, error=f"grader {self.name!r}: {why}")

    async def close(self) -> None:
        """Releases what the grader holds (HTTP sessions); most hold nothing."""
