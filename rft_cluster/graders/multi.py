"""OpenAI's multi grader: sub-graders run concurrently on the same sample, then
`calculate_output` combines their scores (see `formula.py`). Any sub-grader failure fails the
whole grade, naming each failed sub-grader; the scores that did come back are in `details`."""

from __future__ import annotations

import asyncio
from typing import Any

from rft_cluster.config import MultiGrader
from rft_cluster.graders.base import BaseGrader
from rft_cluster.formula import Formula, FormulaError
from rft_cluster.types import GradeResult


class Multi(BaseGrader):
    def __init__(self, spec: MultiGrader, graders: dict[str, BaseGrader]):
        super().__init__(spec.name)
        self._graders = graders
        self._formula = Formula(spec.calculate_output, graders)

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        results = dict(
            zip(self._graders, await asyncio.gather(*(g.grade(sample, item, trace_id) for g in self._graders.values())))
        )
        scores = {name: r.score for name, r in results.items() if r.score is not None}
        failed = [f"sub-grader {name!r} failed: {r.error}" for name, r in results.items() if r.score is None]
        if failed:
            result = self.fail("; ".join(failed))
        else:
            try:
                result = GradeResult(score=self._formula.evaluate(scores))
            except FormulaError as e:
                result = self.fail(f"calculate_output {e}")
        result.details = scores
        return result

    async def close(self) -> None:
        await asyncio.gather(*(g.close() for g in self._graders.values()))
