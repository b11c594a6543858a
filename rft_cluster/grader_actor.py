"""The grader actor (docs/architecture.md §1): scores one rollout's `sample` against its dataset `item`.

A plain class with async methods; the driver wraps it with `ray.remote` (an async actor).
Any failure is returned as `GradeResult(score=None, error=...)`, never as a silent 0; every grade
ends by its deadline, `rollout_timeout_s` from when the actor takes it (`deadlines` states it, with
each grader's and tool's own worst case, for `validate` to print and check).
The grader kinds are implemented in `rft_cluster.graders`, one module each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rft_cluster.config import (
    EndpointGrader,
    Grader,
    MultiGrader,
    PythonGrader,
    Reinforcement,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    ToolSettings,
    request_schedule_s,
)
from rft_cluster.graders.base import BaseGrader
from rft_cluster.graders.endpoint import Endpoint
from rft_cluster.graders.multi import Multi
from rft_cluster.graders.python import KILL_GRACE_S, Python
from rft_cluster.graders.score_model import ScoreModel
from rft_cluster.graders.string_check import StringCheck, check_string
from rft_cluster.graders.template import TemplateError, render_template
from rft_cluster.graders.text_similarity import TextSimilarity
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.types import GradeResult

__all__ = ["Deadline", "GraderActor", "TemplateError", "build_grader", "check_string", "deadlines", "render_template"]


@dataclass(frozen=True)
class Deadline:
    """When one tool call or grade is ended, and how long its own settings may make it take."""

    what: str  # "tool 'lookup'", "grader 'g0' (python)"
    worst_case_s: float | None  # by its own settings (attempts, retries, waits, timeout_s); None: CPU work only
    enforced_s: float  # the run ends it here, from when its proxy or grader actor takes it
    # Under method.reinforcement, the setting its worst case comes from; None: its sub-graders'.
    at: tuple[str, ...] | None

    @property
    def fits(self) -> bool:
        """Its own schedule ends before the run would cut it short."""
        return self.worst_case_s is None or self.worst_case_s <= self.enforced_s

    def line(self) -> str:
        own = "CPU work only" if self.worst_case_s is None else f"its own worst case {self.worst_case_s:g} s"
        return f"{self.what}: ends within {self.enforced_s:g} s (rollout_timeout_s); {own}"


def _grader_worst_case_s(spec: Grader, settings: ToolSettings) -> float | None:
    if isinstance(spec, (EndpointGrader, ScoreModelGrader)):
        return request_schedule_s(settings)
    if isinstance(spec, PythonGrader):
        return spec.timeout_s + KILL_GRACE_S
    if isinstance(spec, MultiGrader):  # its sub-graders run at once
        own = [_grader_worst_case_s(sub, settings) for sub in spec.graders.values()]
        return max((s for s in own if s is not None), default=None)
    return None  # string_check, text_similarity: linear CPU work in a thread


def deadlines(rl: Reinforcement) -> list[Deadline]:
    """One per tool, then the grader and (for a multi grader) each sub-grader at any depth: what
    `validate` states. Every one is enforced at `tool_settings.rollout_timeout_s` (queueing for a
    concurrency slot or a rate limit included); one whose own worst case is longer (`fits` is
    False) would be cut short by it, and `validate` refuses it (rft_cluster/preflight.py)."""
    settings = rl.tool_settings
    enforced = settings.rollout_timeout_s
    tools = [Deadline(f"tool {t.name!r}", request_schedule_s(settings), enforced, ("tool_settings",)) for t in rl.tools]
    return tools + [Deadline(f"grader {name!r} ({g.type})", _grader_worst_case_s(g, settings), enforced, _setting(g, path))
                    for name, g, path in _graders(rl.grader.name, rl.grader, ("grader",))]


def _graders(name: str, spec: Grader, path: tuple[str, ...]) -> Iterator[tuple[str, Grader, tuple[str, ...]]]:
    """The grader and, nested at any depth, its sub-graders: (dotted name, spec, key path)."""
    yield name, spec, path
    if isinstance(spec, MultiGrader):
        for sub_name, sub in spec.graders.items():
            yield from _graders(f"{name}.{sub_name}", sub, (*path, "graders", sub_name))


def _setting(spec: Grader, path: tuple[str, ...]) -> tuple[str, ...] | None:
    if isinstance(spec, PythonGrader):
        return (*path, "timeout_s")
    if isinstance(spec, (EndpointGrader, ScoreModelGrader)):
        return ("tool_settings",)
    return None if isinstance(spec, MultiGrader) else path


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
        self._deadline_s = settings.rollout_timeout_s
        self._redact = redactor or Redactor()
        if redactor is not None:  # the job's: this process's log records go through it too
            redact_logs(redactor)

    async def grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._deadline_s):
                result = await self._grader.grade(sample, item, trace_id)
        except TimeoutError:
            result = self._grader.fail(f"no result within the grade's deadline of rollout_timeout_s={self._deadline_s:g} s")
        result.latency_s = time.monotonic() - started
        if result.error is not None:
            result.error = self._redact.text(result.error)
        return result

    async def close(self) -> None:
        await self._grader.close()
