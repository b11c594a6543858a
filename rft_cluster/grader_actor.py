"""The grader actor (docs/architecture.md §1): scores one rollout's `sample` against its dataset `item`.

A plain class with async methods; the driver wraps it with `ray.remote` (an async actor).
Any failure is returned as `GradeResult(score=None, error=...)`, never as a silent 0.
The grader kinds are implemented in `rft_cluster.graders`, one module each.
"""

from __future__ import annotations

import time
from typing import Any

from rft_cluster.config import (
    EndpointGrader,
    Grader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    ToolSettings,
)
from rft_cluster.graders.base import BaseGrader
from rft_cluster.graders.endpoint import Endpoint
from rft_cluster.graders.multi import Multi
from rft_cluster.graders.python import Python
from rft_cluster.graders.score_model import ScoreModel
from rft_cluster.graders.string_check import StringCheck, check_string
from rft_cluster.graders.template import TemplateError, render_template
from rft_cluster.graders.text_similarity import TextSimilarity
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.types import GradeResult

__all__ = ["GraderActor", "TemplateError", "build_grader", "check_string", "render_template"]


def build_grader(spec: Grader, settings: ToolSettings) -> BaseGrader:
    """The implementation of a grader config (recursively, for a multi grader's sub-graders).
    `settings` (the job's tool_settings) governs the HTTP of endpoint and score_model graders."""
    grader = _implementation(spec, settings)
    grader.score_range = spec.score_range
    return grader


def _implementation(spec: Grader, settings: ToolSettings) -> BaseGrader:
    if isinstance(spec, StringCheckGrader):
        return StringCheck(spec)
    if isinstance(spec, TextSimilarityGrader):
        return TextSimilarity(spec)
    if isinstance(spec, EndpointGrader):
        return Endpoint(spec, settings)
    if isinstance(spec, ScoreModelGrader):
        return ScoreModel(spec, settings)
    if isinstance(spec, PythonGrader):
        return Python(spec)
    if isinstance(spec, MultiGrader):
        return Multi(spec, {name: build_grader(sub, settings) for name, sub in spec.graders.items()})
    raise TypeError(f"unknown grader config {type(spec).__name__}")


class GraderActor:
    """`redactor` (the job's) hides secrets in error texts and in this process's logs."""

    def __init__(self, grader: Grader, settings: ToolSettings, redactor: Redactor | None = None):
        self._grader = build_grader(grader, settings)
        self._redact = redactor or Redactor()
        if redactor is not None:  # the job's: this process's log records go through it too
            redact_logs(redactor)

    async def grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        started = time.monotonic()
        result = await self._grader.grade(sample, item, trace_id)
        result.latency_s = time.monotonic() - started
        if result.error is not None:
            result.error = self._redact.text(result.error)
        return result

    async def close(self) -> None:
        await self._grader.close()
